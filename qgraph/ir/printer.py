"""A readable text form of a graph: one line per node with op, inputs, shape and annotations."""
from __future__ import annotations

from typing import Any

from qgraph.ir.graph_view import ANNOTATION_KEY, FUSION_KEY


def _shape_text(shape: tuple | None) -> str:
    return "?" if shape is None else "[" + ",".join(str(d) for d in shape) + "]"


def format_annotation(ann: Any) -> str:
    if getattr(ann, "fallback_float", False):
        return "float (fallback)"
    parts = [f"w={ann.weight}"] if getattr(ann, "weight", None) is not None else []
    parts += [f"in{i}={s}" for i, s in sorted(getattr(ann, "inputs", {}).items())]
    if getattr(ann, "output", None) is not None:
        parts.append(f"out={ann.output}")
    return " ".join(parts) or str(ann)


def format_graph(graph: Any) -> str:
    nodes = graph.nodes()
    lines = [f"graph {getattr(graph, 'name_', 'model')} (frontend={graph.frontend}, {len(nodes)} nodes)"]
    for inp in getattr(graph, "input_nodes", list)():
        lines.append(f"  %{graph.name(inp)} : {_shape_text(graph.shape(inp))} = input")
    for node in nodes:
        args = ", ".join(f"%{graph.name(a)}" for a in graph.inputs(node))
        consts = []
        for role in ("weight", "bias"):
            t = graph.param(node, role)
            if t is not None:
                consts.append(f"{role[0]}:{_shape_text(tuple(t.shape))}")
        if consts:
            args = ", ".join(x for x in (args, " ".join(consts)) if x)
        line = f"  %{graph.name(node)} : {_shape_text(graph.shape(node))} = {graph.op_type(node)}({args})"
        meta = graph.meta(node)
        extras = []
        ann = meta.get(ANNOTATION_KEY)
        if ann is not None:
            extras.append(format_annotation(ann))
        if meta.get(FUSION_KEY):
            extras.append(f"fused:{meta[FUSION_KEY]}")
        if extras:
            line += "  # " + "; ".join(extras)
        lines.append(line)
    out = getattr(graph, "output_node", None)
    if out is not None:
        lines.append("  return " + ", ".join(f"%{graph.name(a)}" for a in out().all_input_nodes))
    return "\n".join(lines)
