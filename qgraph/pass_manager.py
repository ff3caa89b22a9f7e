"""`PassManager`: validates ordering and property constraints, runs passes with instruments and
keeps cached analyses coherent."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import networkx as nx

from qgraph.context import PassContext
from qgraph.errors import PassError, PassOrderError, PipelineError, QGraphError
from qgraph.pass_base import Pass, PassResult
from qgraph.pipeline import format_pipeline, parse_pipeline
from qgraph.registry import registered_passes


def ordering_graph(pass_classes: Iterable[type[Pass]] | None = None) -> nx.DiGraph:
    """Directed graph of "must run before" edges between pass names (from ``after``/``before``)."""
    classes = list(pass_classes) if pass_classes is not None else list(registered_passes().values())
    g = nx.DiGraph()
    for cls in classes:
        g.add_node(cls.name)
        for other in cls.after:
            g.add_edge(other, cls.name)
        for other in cls.before:
            g.add_edge(cls.name, other)
    return g


def check_order(passes: list[Pass], extra_classes: Iterable[type[Pass]] = ()) -> None:
    """Raise `PassOrderError` on a cycle among the constraints or a pipeline that violates them."""
    classes = {type(p).name: type(p) for p in passes}
    all_classes = {**registered_passes(), **classes, **{c.name: c for c in extra_classes}}
    g = ordering_graph(all_classes.values())
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        path = " -> ".join([a for a, _ in cycle] + [cycle[0][0]])
        raise PassOrderError(f"pass ordering constraints form a cycle: {path}; remove one of the after/before "
                             f"declarations")
    names = [type(p).name for p in passes]
    violations = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if a != b and b in g and a in g and nx.has_path(g, b, a):
                violations.append(f"'{b}' must run before '{a}'")
    if violations:
        raise PassOrderError(
            "pipeline order violates pass constraints: " + "; ".join(dict.fromkeys(violations))
            + f". Reorder the pipeline (got: {format_pipeline(passes)})"
        )


def check_properties(passes: list[Pass], available: set[str]) -> None:
    """Raise `PipelineError` when a pass requires a graph property no earlier pass ensures."""
    have = set(available)
    providers: dict[str, list[str]] = {}
    for name, cls in registered_passes().items():
        for prop in cls.ensures_properties:
            providers.setdefault(prop, []).append(name)
    for p in passes:
        missing = sorted(p.requires() - have)
        if missing:
            who = providers.get(missing[0], [])
            hint = f"; add {' or '.join(repr(w) for w in who)} before it" if who else ""
            raise PipelineError(f"pass '{p}' requires the graph to be {missing[0]!r} and nothing before it "
                                f"makes it so{hint}")
        have |= p.ensures()


def run_pass(p: Pass, graph: Any, ctx: PassContext, ran: list[str]) -> Any:
    """``p.run(graph, ctx)``; an unexpected exception becomes a `PassError` naming ``p``, its options and the
    passes in ``ran`` (chained), while qgraph's own typed errors pass through unchanged."""
    try:
        return p.run(graph, ctx)
    except QGraphError:
        raise
    except Exception as e:
        raise PassError(str(p), getattr(p, "options", None), ran, e) from e


def check_frontends(passes: list[Pass], graph: Any) -> None:
    """Raise `PipelineError` when a pass does not run on ``graph``'s IR family (``Pass.frontends``)."""
    ir_name = getattr(graph, "ir", None)
    if ir_name is None:
        return
    for p in passes:
        allowed = set(type(p).frontends)
        if ir_name in allowed:
            continue
        why = f" ({type(p).frontend_reason})" if type(p).frontend_reason else ""
        kinds = " and ".join(_IR_NAMES.get(f, f) for f in sorted(allowed))
        hint = ("quantize the torch model instead of its ONNX export" if "fx" in allowed
                else "load the model from ONNX")
        this = _IR_NAMES.get(ir_name, ir_name)
        raise PipelineError(f"pass '{p.name}' runs on {kinds} graphs only{why}, and this is {_ARTICLE.get(this, 'a')} {this} "
                            f"graph; {hint}, or drop '{p.name}' from the pipeline")


_IR_NAMES = {"fx": "torch.fx", "onnx": "ONNX"}
_ARTICLE = {"torch.fx": "a", "ONNX": "an"}


class PassManager:
    """Runs a list of passes (or pipeline text) over a graph ``steps`` times."""

    def __init__(self, passes: list[Pass] | str, *, steps: int = 1, check: bool = True):
        self.passes = parse_pipeline(passes) if isinstance(passes, str) else list(passes)
        for p in self.passes:
            if not isinstance(p, Pass):
                raise PipelineError(f"PassManager takes Pass instances or pipeline text, got {p!r}")
        if steps < 1:
            raise PipelineError(f"steps must be ≥ 1, got {steps}")
        self.steps = steps
        if check:
            check_order(self.passes)

    def __str__(self) -> str:
        return format_pipeline(self.passes)

    def run(self, graph: Any, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx if ctx is not None else PassContext()
        check_properties(self.passes, set(getattr(graph, "properties", set())))
        check_frontends(self.passes, graph)
        for inst in ctx.instruments:
            inst.before_pipeline(graph, ctx)
        any_modified = False
        stats: dict[str, Any] = {}
        ran: list[str] = []
        for _ in range(self.steps):
            step_modified = False
            for p in self.passes:
                for inst in ctx.instruments:
                    inst.before_pass(p, graph, ctx)
                result = run_pass(p, graph, ctx, ran)
                ran.append(str(p))
                if not isinstance(result, PassResult):
                    raise PipelineError(f"pass '{p.name}' returned {type(result).__name__}, not a PassResult")
                graph = result.graph
                if result.modified:
                    ctx.invalidate(result.preserved)
                    step_modified = True
                if hasattr(graph, "properties"):
                    graph.properties |= set(p.ensures())
                stats[p.name] = result.stats
                for inst in ctx.instruments:
                    inst.after_pass(p, graph, ctx, result)
            any_modified |= step_modified
            if not step_modified:
                break
        for inst in ctx.instruments:
            inst.after_pipeline(graph, ctx)
        return PassResult(graph, any_modified, stats=stats)
