"""fuse-activation: record producer+activation fusion patterns (Conv+Relu, Gemm+Gelu...) for targets.

The graph is not rewritten: the producer gets ``meta["qgraph.fusion"] = "Conv+Relu"`` and the
activation ``meta["qgraph.fused_into"] = <producer name>``, so annotate can skip quantizing the
intermediate tensor and lowering can pick a fused kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

from qgraph.ir.meta import FUSED_INTO_KEY, FUSION_KEY
from qgraph.pass_base import Pass, PassResult, Rule, each, validate
from qgraph.registry import register_pass

DEFAULT_PATTERNS = (
    "Conv+Relu", "Conv+Clip", "Conv+HardSwish", "Gemm+Relu", "Gemm+Gelu", "Gemm+Clip",
    "MatMul+Relu", "MatMul+Gelu", "Add+Relu",
)
PATTERN = Rule(lambda p: len(p.split("+")) == 2 and all(p.split("+")), 'of the form "Producer+Activation"')


@register_pass("fuse-activation", after=("fold-bn",), before=("annotate",), ensures=("fusion-marked",))
class FuseActivation(Pass):
    """Mark producer → activation pairs that a target runs as one kernel."""

    @dataclass(frozen=True)
    class Options:
        patterns: tuple[str, ...] = ()

        def __post_init__(self):
            validate(self, patterns=each(PATTERN))

    def run(self, graph, ctx) -> PassResult:
        patterns = set(self.options.patterns)
        if not patterns:
            target_patterns = getattr(ctx.target, "fusions", None)
            patterns = set(target_patterns) if target_patterns else set(DEFAULT_PATTERNS)
        marked = 0
        for act in graph.nodes():
            producers = graph.producers(act)
            if len(producers) != 1 or producers[0] is None:
                continue
            producer = producers[0]
            pattern = f"{graph.op_type(producer)}+{graph.op_type(act)}"
            if pattern not in patterns or len(graph.users(producer)) != 1:
                continue
            graph.meta(producer)[FUSION_KEY] = pattern
            graph.meta(act)[FUSED_INTO_KEY] = graph.name(producer)
            marked += 1
        return PassResult(graph, modified=marked > 0, preserved=frozenset({"*"}), stats={"fused": marked})
