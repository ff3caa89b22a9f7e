"""check-target: every annotated node must be something the target can run.

Without ``fallback`` a strategy the target cannot express is an error listing each offending node
and why; with ``fallback=true`` those nodes are demoted to float with a warning.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from qgraph.errors import TargetError
from qgraph.ir.meta import ANNOTATION_KEY
from qgraph.pass_base import Pass, PassResult
from qgraph.quant.qspec import Annotation
from qgraph.registry import register_pass
from qgraph.target import load_target


@register_pass("check-target", after=("annotate",), before=("calibrate", "quantize-weights", "insert-fq"),
               requires=("annotated",), ensures=("target-checked",))
class CheckTarget(Pass):
    @dataclass(frozen=True)
    class Options:
        fallback: bool = False

    def run(self, graph, ctx) -> PassResult:
        target = ctx.target if ctx.target is not None else load_target("generic")
        target = load_target(target) if isinstance(target, str) else target
        problems = []
        for node in graph.nodes():
            ann = graph.meta(node).get(ANNOTATION_KEY)
            if ann is None or not ann.is_quantized:
                continue
            reasons = target.check(graph.op_type(node), ann.weight, ann.inputs.get(0))
            if reasons:
                problems.append((node, reasons))
        if problems and not self.options.fallback:
            lines = [f"  {graph.qualname(n)} ({graph.op_type(n)}): {'; '.join(r)}" for n, r in problems[:20]]
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise TargetError(
                f"target {target.name} cannot run {len(problems)} annotated node(s):\n" + "\n".join(lines) + more
                + "\nChange the strategy, or run check-target{fallback=true} to keep those nodes in float."
            )
        for node, reasons in problems:
            graph.meta(node)[ANNOTATION_KEY] = Annotation(fallback_float=True)
        if problems:
            warnings.warn(f"check-target: {len(problems)} node(s) demoted to float for {target.name} "
                          f"(first: {graph.qualname(problems[0][0])}: {problems[0][1][0]})", stacklevel=2)
        demoted = [{"node": graph.qualname(n), "reasons": r} for n, r in problems]
        ctx.report.setdefault("check-target", {})["demoted"] = demoted
        return PassResult(graph, modified=bool(problems), preserved=frozenset({"*"}),
                          stats={"demoted": len(problems)})
