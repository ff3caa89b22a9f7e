"""Blocks for block-wise reconstruction (BRECQ), found from the graph's structure.

- A **residual add** is an ``Add`` of two tensors one of which is an ancestor of the other (``x + f(x)``).
  Its **residual block** is the span from that skip source (exclusive) to the add (inclusive): every node
  that descends from the source and leads to the add — e.g. a MobileNetV2 inverted residual, a BERT / Llama
  attention or MLP sub-block. Spans are taken smallest first and kept when disjoint from those already
  kept (nested or overlapping skips, such as U-Net long skips, lose to the inner ones) and when the graph with
  every kept block contracted to one node stays acyclic, so each block can run as one contiguous step.
- ``merge=m`` joins ``m`` consecutive residual blocks on one residual stream into one block (``m = 2``: a
  transformer layer, attention + MLP), with every node between them.
- `schedule` orders the graph so that each block's nodes are contiguous (a topological order of the
  contracted graph, ties broken by the original order); the nodes outside blocks keep their relative order.
- `gap_blocks` cuts the runs of the schedule that lie outside residual blocks into blocks of ``k`` chosen
  layers (fewer for the last), each from a chosen layer up to the next block's first one or the run's end
  (contiguous pieces of a topological order are convex, so each runs on its own); ``k = 1`` gives every such
  layer its own block.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx

from qgraph.registry import register_analysis


@dataclass(frozen=True)
class Block:
    """``nodes``: compute nodes in execution order; ``inputs``: values from outside the block that its nodes
    read (graph inputs included); ``outputs``: block nodes read outside it (or graph outputs); ``kind``:
    ``residual`` / ``merged`` / ``gap``; ``entry``: the skip source (residual kinds)."""

    nodes: tuple
    inputs: tuple
    outputs: tuple
    kind: str
    entry: Any = None

    @property
    def exit(self) -> Any:
        return self.nodes[-1]

    def __len__(self) -> int:
        return len(self.nodes)


def _dag(graph) -> tuple[nx.DiGraph, dict]:
    """Compute nodes and graph inputs as a networkx DiGraph; position of each node in the graph's order."""
    g = nx.DiGraph()
    inputs = list(graph.input_nodes()) if hasattr(graph, "input_nodes") else []
    nodes = graph.nodes()
    pos = {n: i for i, n in enumerate(inputs + nodes)}
    g.add_nodes_from(pos)
    for n in nodes:
        for a in graph.inputs(n):
            if a in pos:
                g.add_edge(a, n)
    return g, pos


def residual_adds(graph, dag: nx.DiGraph | None = None) -> list[tuple[Any, Any]]:
    """``(add, skip source)`` for every residual add, in graph order."""
    dag = dag if dag is not None else _dag(graph)[0]
    out = []
    for n in graph.nodes():
        if graph.op_type(n) != "Add":
            continue
        ins = [a for a in dict.fromkeys(graph.inputs(n)) if a in dag]
        if len(ins) < 2:
            continue
        sources = [a for a in ins if any(b is not a and nx.has_path(dag, a, b) for b in ins)]
        if sources:
            # the source nearest the add (latest) when several inputs are ancestors of another
            out.append((n, max(sources, key=lambda a: len(nx.ancestors(dag, a)))))
    return out


def _span(dag: nx.DiGraph, source, exit_, compute: set) -> set:
    return ((nx.descendants(dag, source) & nx.ancestors(dag, exit_)) | {exit_}) & compute


def _contracted_is_dag(dag: nx.DiGraph, blocks: list[set]) -> bool:
    owner = {}
    for i, b in enumerate(blocks):
        for n in b:
            owner[n] = ("b", i)
    c = nx.DiGraph()
    c.add_nodes_from(owner.get(n, n) for n in dag)
    for u, v in dag.edges:
        cu, cv = owner.get(u, u), owner.get(v, v)
        if cu != cv:
            c.add_edge(cu, cv)
    return nx.is_directed_acyclic_graph(c)


def find_blocks(graph, merge: int = 1) -> list[Block]:
    """Residual blocks of ``graph`` (see the module docstring), in execution order."""
    if merge < 1:
        raise ValueError(f"merge must be >= 1, got {merge}")
    dag, pos = _dag(graph)
    compute = set(graph.nodes())
    spans = []
    for add, src in residual_adds(graph, dag):
        nodes = _span(dag, src, add, compute)
        if len(nodes) > 1:
            spans.append((len(nodes), pos[add], add, src, nodes))
    kept: list[tuple[Any, Any, set]] = []
    taken: set = set()
    for _, _, add, src, nodes in sorted(spans, key=lambda s: (s[0], s[1])):
        if nodes & taken or not _contracted_is_dag(dag, [k[2] for k in kept] + [nodes]):
            continue
        kept.append((add, src, nodes))
        taken |= nodes
    kept.sort(key=lambda k: pos[k[0]])
    if merge > 1:
        kept = _merge(dag, kept, merge, compute, pos)
    kind = "residual" if merge == 1 else "merged"
    return [_block(graph, dag, nodes, pos, kind, src) for _, src, nodes in kept]


def _merge(dag, kept, merge, compute, pos):
    groups, cur = [], []
    for item in kept:
        if cur and not (item[1] is cur[-1][0] or nx.has_path(dag, cur[-1][0], item[1])):
            groups.append(cur)
            cur = []
        cur.append(item)
        if len(cur) == merge:
            groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    out, blocks = [], []
    for grp in groups:
        nodes = set().union(*(g[2] for g in grp)) | _span(dag, grp[0][1], grp[-1][0], compute)
        if any(nodes & b for b in blocks) or not _contracted_is_dag(dag, blocks + [nodes]):
            for g in grp:  # keep them apart
                out.append(g)
                blocks.append(g[2])
            continue
        out.append((grp[-1][0], grp[0][1], nodes))
        blocks.append(nodes)
    return out


def _block(graph, dag, nodes: set, pos: dict, kind: str, entry=None) -> Block:
    order = sorted(nodes, key=lambda n: pos[n])
    inputs = []
    for n in order:
        for a in graph.inputs(n):
            if a not in nodes and a not in inputs:
                inputs.append(a)
    out_node = graph.output_node() if hasattr(graph, "output_node") else None
    outputs = [n for n in order if any(u not in nodes for u in graph.users(n))
               or (out_node is not None and n in getattr(out_node, "all_input_nodes", ()))]
    return Block(tuple(order), tuple(inputs), tuple(outputs), kind, entry)


def schedule(graph, blocks: Sequence[Block]) -> list:
    """The compute nodes in a topological order where each block's nodes are contiguous: a list of nodes and
    `Block` objects (a block stands for its nodes, in order)."""
    dag, pos = _dag(graph)
    owner = {}
    for i, b in enumerate(blocks):
        for n in b.nodes:
            owner[n] = i
    c = nx.DiGraph()
    unit_pos: dict = {}
    for n in graph.nodes():
        u = ("b", owner[n]) if n in owner else n
        c.add_node(u)
        unit_pos[u] = min(unit_pos.get(u, pos[n]), pos[n])
    for u, v in dag.edges:
        if u not in unit_pos and u not in owner:  # graph inputs
            continue
        cu = ("b", owner[u]) if u in owner else u
        cv = ("b", owner[v]) if v in owner else v
        if cu != cv:
            c.add_edge(cu, cv)
    if not nx.is_directed_acyclic_graph(c):
        raise ValueError("the blocks cannot each run as one contiguous step (contracted graph has a cycle)")
    order = nx.lexicographical_topological_sort(c, key=lambda u: unit_pos[u])
    return [blocks[u[1]] if isinstance(u, tuple) and len(u) == 2 and u[0] == "b" else u for u in order]


def gap_blocks(graph, plan: list, chosen: Callable[[Any], bool], k: int) -> list:
    """Replace, in a `schedule` output, each run of loose nodes by blocks of ``k`` chosen layers, each from a
    chosen layer to just before the next block's first chosen layer (or the run's end); the nodes of a run
    before its first chosen layer stay loose."""
    if k < 1:
        raise ValueError(f"gap block size must be >= 1, got {k}")
    dag, pos = _dag(graph)
    out: list = []
    run: list = []

    def flush():
        marks = [i for i, n in enumerate(run) if chosen(n)]
        out.extend(run[: marks[0]] if marks else run)
        for c in range(0, len(marks), k):
            end = marks[c + k] if c + k < len(marks) else len(run)
            out.append(_block(graph, dag, set(run[marks[c] : end]), pos, "gap"))
        run.clear()

    for item in plan:
        if isinstance(item, Block):
            flush()
            out.append(item)
        else:
            run.append(item)
    flush()
    return out


@register_analysis("blocks")
def blocks_analysis(graph, ctx) -> list[Block]:
    """Residual blocks of the graph (``find_blocks`` with ``merge=1``)."""
    return find_blocks(graph)
