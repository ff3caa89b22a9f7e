"""lower-bcq: Gemm nodes with a BCQ weight become `BCQLinear` modules calling ``torch.ops.qgraph.biqgemm``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qgraph.ir.meta import ANNOTATION_KEY, KERNEL_KEY, QWEIGHT_KEY
from qgraph.lowering import record, snapshot_simulation, target_of
from qgraph.pass_base import NON_NEGATIVE, Pass, PassResult, validate
from qgraph.quant.bcq_weight import BCQWeight
from qgraph.registry import register_pass

# Fast mode's relative output error on Gaussian data, as measured and tested in qgraph.kernels.cpu (LUT and GEMM paths).
FAST_MODE_REL_ERR = 1e-2


@register_pass("lower-bcq", after=("quantize-weights", "insert-fq"), requires=("weights-quantized",),
               ensures=("lowered",))
class LowerBCQ(Pass):
    """``mode=exact`` keeps fp32 tables (≤1e-5 of the reference); ``mode=fast`` uses int8 tables/activations (about
    1e-2 relative); ``mode=auto`` (default) takes fast when ``tol`` (the verify tolerance asked for) admits it."""

    @dataclass(frozen=True)
    class Options:
        mode: Literal["auto", "exact", "fast"] = "auto"
        tol: float = 1e-4

        def __post_init__(self):
            validate(self, tol=NON_NEGATIVE)

    def choose_mode(self) -> tuple[str, str]:
        """The kernel mode to lower with, and why."""
        if self.options.mode != "auto":
            return self.options.mode, "asked for"
        if self.options.tol >= FAST_MODE_REL_ERR:
            return "fast", f"tol {self.options.tol:g} admits fast mode's ~{FAST_MODE_REL_ERR:g} relative error"
        return "exact", f"tol {self.options.tol:g} is below fast mode's ~{FAST_MODE_REL_ERR:g} relative error"

    def run(self, graph, ctx) -> PassResult:
        target = target_of(ctx)
        snapshot_simulation(graph, ctx)
        mode, why = self.choose_mode()
        ctx.report["lower-bcq"] = {"mode": mode, "reason": why}
        lowered = 0
        for node in list(graph.nodes()):
            q = graph.meta(node).get(QWEIGHT_KEY)
            if not isinstance(q, BCQWeight):
                continue
            op, name = graph.op_type(node), graph.qualname(node)
            ann = graph.meta(node).get(ANNOTATION_KEY)
            kernel = target.kernel_for(op, ann.weight, None) if ann is not None else None
            if kernel != "biqgemm":
                record(ctx, name, op, "float", "float", f"target {target.name} has no BiQGEMM kernel for {op}")
                continue
            w = graph.param(node, "weight")
            if not graph.is_linear(node) or w is None or tuple(w.shape) != tuple(q.shape):
                record(ctx, name, op, "float", "float", "BiQGEMM runs x @ Wᵀ (a Linear) only; kept as simulated float")
                continue
            if not graph.supports_kernel("biqgemm"):
                record(ctx, name, op, "float", "float", f"the {graph.ir} adapter has no BiQGEMM kernel")
                continue
            new = graph.replace_with_kernel(node, "biqgemm", q, bias=graph.param(node, "bias"), mode=mode)
            record(ctx, name, op, "biqgemm", "lowered",
                   f"{q.bits}-bit, group {q.group_size}, {graph.meta(new).get(KERNEL_KEY)}, mode={mode} ({why})")
            lowered += 1
        if lowered:
            graph.recompile()
        return PassResult(graph, modified=lowered > 0, stats={"lowered": lowered})
