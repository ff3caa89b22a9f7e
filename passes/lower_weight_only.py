"""lower-weight-only: replace Gemm / MatMul nodes with weight-only uniform quantization (no activation
spec) by modules that keep the integer weight and run a weight-only kernel.

- target kernel ``int8_weight_only``: `Int8WeightOnlyLinear` (signed symmetric 8-bit codes, one scale per output
  channel or per tensor; ``qgraph::int8_weight_only_linear``, see `qgraph.kernels.int8`);
- ``int4_weight_only``: 2-4 bit codes of an ``[N, K]`` weight quantized along rows run on BiQGEMM (exact mode) in
  their exact BCQ form (`qgraph.quant.uniform_bcq`): on this project's machines torch's
  ``aten._weight_int4pack_mm_for_cpu`` was 16x slower than fp32 ``F.linear`` at one input row and 37-83x at 128
  (SmolLM2's 576x576 / 1536x576, one thread), where BiQGEMM runs at memory speed at one row and at about fp32's
  speed at 128 rows (bench/biqgemm.py). Other 2-4-bit layouts keep ``_weight_int4pack_mm_for_cpu`` (signed or
  unsigned, symmetric or not: codes go into 4-bit containers and the zero point into the kernel's per-group z;
  groups of 32 / 64 / 128 / 256 along K; per-channel / per-tensor scales are repeated over the largest of those
  group sizes that divides K).
- anything those kernels cannot take (other group sizes, asymmetric int8, scales along K of a
  ``[K, N]`` MatMul weight, K not divisible by 32) runs as `DequantLinear`, which dequantizes the
  stored codes on each call; its report entry says ``dequant`` and why.
- on an IR without torch modules (ONNX), the weight becomes its integer codes + DequantizeLinear feeding the op
  (``dequantize_linear``: the file `qgraph.export` writes; onnxruntime fuses e.g. blocked 4-bit MatMuls into
  MatMulNBits). Outputs match the torch path within float rounding (tested at 1e-5 relative).
Outputs match the fake-quant simulation up to float summation order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qgraph.errors import KernelError, PipelineError, SpecError
from qgraph.ir.meta import ANNOTATION_KEY, FQ_KEY, KERNEL_KEY, QWEIGHT_KEY
from qgraph.kernels.int8 import INT4_GROUP_SIZES, DequantLinear, Int4WeightOnlyLinear, Int8WeightOnlyLinear
from qgraph.kernels.linear import BCQLinear
from qgraph.lowering import snapshot_simulation, target_of
from qgraph.pass_base import Pass, PassResult
from qgraph.passes.lower_int8 import (
    GEMM_OPS,
    codes_nk,
    finish_replacement,
    module_name,
    no_kernel_here,
    report_entry,
)
from qgraph.quant.qtensor import UniformWeight
from qgraph.quant.uniform_bcq import uniform_to_bcq
from qgraph.registry import register_pass

WEIGHT_ONLY_KERNELS = ("int8_weight_only", "int4_weight_only")


@register_pass("lower-weight-only", after=("annotate", "quantize-weights", "insert-fq", "check-target", "lower-int8"),
               requires=("annotated",), ensures=("lowered", "lowered-weight-only"))
class LowerWeightOnly(Pass):
    """Lower weight-only uniform Gemm / MatMul nodes (see the module docstring).

    ``fallback=dequant`` (default) runs specs no torch kernel takes with a dequantize-on-the-fly
    module; ``fallback=float`` leaves them as they are (float, or the fake-quant simulation). ``bcq_mode``: the
    BiQGEMM mode of the row-wise 2-4-bit layers (``exact``: fp32 tables, ``fast``: int8 tables / activations,
    see lower-bcq).
    """

    @dataclass(frozen=True)
    class Options:
        fallback: Literal["dequant", "float"] = "dequant"
        bcq_mode: Literal["exact", "fast"] = "exact"

    def run(self, graph, ctx) -> PassResult:
        target = target_of(ctx)
        count = {"int8_weight_only": 0, "int4_weight_only": 0, "biqgemm": 0, "dequant": 0, "dequantize_linear": 0}
        for node in list(graph.nodes()):
            ann = graph.meta(node).get(ANNOTATION_KEY)
            if ann is None or ann.weight is None or ann.weight.scheme != "uniform" or ann.inputs:
                continue
            op = graph.op_type(node)
            if op not in GEMM_OPS:
                continue
            name = graph.name(node)
            qweight = graph.meta(node).get(QWEIGHT_KEY)
            if qweight is None:
                raise PipelineError(f"lower-weight-only: node {name} has a weight spec but no quantized weight; "
                                    f"run quantize-weights before lower-weight-only")
            kernel = target.kernel_for(op, ann.weight, None)
            simulated = "; kept as the fake-quant simulation" if graph.meta(node).get(FQ_KEY) else ""
            if not isinstance(qweight, UniformWeight):
                report_entry(ctx, graph, node, op, "float", "float",
                             f"no weight-only kernel takes a {type(qweight).__name__}{simulated}")
                continue
            if kernel not in WEIGHT_ONLY_KERNELS:
                why = (f"target {target.name} has no weight-only kernel for {op} with {ann.weight}" if kernel is None
                       else f"target {target.name} maps {op} with {ann.weight} to {kernel!r}")
                report_entry(ctx, graph, node, op, "float", "float", why + simulated)
                continue
            if not graph.supports_kernel(kernel):
                if not graph.supports_kernel("dequantize_linear") or graph.weight_layout(node) is None:
                    report_entry(ctx, graph, node, op, "float", "float", no_kernel_here(graph, kernel))
                    continue
                snapshot_simulation(graph, ctx)
                new = graph.replace_with_kernel(node, "dequantize_linear", qweight)
                report_entry(ctx, graph, node, op, "dequantize_linear", "lowered",
                             f"{graph.ir} has no {kernel} kernel: integer codes + DequantizeLinear, as qgraph.export "
                             f"writes them ({graph.meta(new).get(KERNEL_KEY)})")
                finish_replacement(graph, new, None, "dequantize_linear", ann, name)
                count["dequantize_linear"] += 1
                continue
            layout = graph.weight_layout(node)
            if layout is None:
                report_entry(ctx, graph, node, op, "float", "float",
                             f"{kernel}: only a constant 2-D weight operand can be lowered" + simulated)
                continue
            bias = graph.param(node, "bias")
            module, reason = _build(kernel, qweight, bias, layout, self.options.bcq_mode)
            used = "biqgemm" if isinstance(module, BCQLinear) else kernel
            if module is None:
                if self.options.fallback == "float":
                    report_entry(ctx, graph, node, op, "float", "float", f"{kernel}: {reason}{simulated}")
                    continue
                module, used = DequantLinear(qweight, bias, layout), "dequant"
                reason = f"dequantize-on-the-fly fallback: {reason}"
            report_entry(ctx, graph, node, op, used, "lowered", reason)
            snapshot_simulation(graph, ctx)
            new = graph.replace_with_module(node, module, module_name(graph, node))
            finish_replacement(graph, new, None, used, ann, name)
            count[used] += 1
        if any(count.values()):
            graph.recompile()
        return PassResult(graph, modified=any(count.values()), stats=count)


def _build(kernel: str, qweight, bias, layout: str, bcq_mode: str = "exact"):
    """(module, reason) for the torch kernel, or (None, why not)."""
    spec = qweight.spec
    got = codes_nk(qweight, layout)
    if isinstance(got, str):
        return None, got
    codes, scale, zp = got
    k = codes.shape[1]
    if kernel == "int8_weight_only":
        if spec.bits != 8 or not spec.signed:
            return None, f"the int8 weight-only kernel takes signed 8-bit codes, got {spec}"
        if not spec.symmetric:
            return None, "the int8 weight-only kernel takes symmetric weights only (no zero point)"
        if spec.granularity == "group":
            return None, f"the int8 weight-only kernel has one scale per output channel, not groups of {spec.group_size}"
        return Int8WeightOnlyLinear(codes, scale, bias), "qgraph::int8_weight_only_linear (int8 codes dequantized a chunk of rows at a time, fp32 scales)"
    if spec.bits > 4:
        return None, f"the int4 kernel takes at most 4-bit codes, got {spec}"
    if layout == "nk" and qweight.codes.dim() == 2 and spec.axis == 0:
        try:
            module = BCQLinear(uniform_to_bcq(qweight), bias, mode=bcq_mode)
            return module, f"BiQGEMM, {bcq_mode} mode ({spec.bits}-bit uniform codes in their exact BCQ form)"
        except (KernelError, SpecError):
            pass  # torch's int4 kernel below
    if spec.granularity == "group":
        if spec.group_size not in INT4_GROUP_SIZES:
            return None, f"_weight_int4pack_mm_for_cpu takes group sizes {INT4_GROUP_SIZES}, got {spec.group_size}"
        group = spec.group_size
    else:
        fits = [g for g in sorted(INT4_GROUP_SIZES, reverse=True) if k % g == 0]
        if not fits:
            return None, f"K={k} is not a multiple of 32, the smallest int4 group size"
        group = fits[0]
    try:
        module = Int4WeightOnlyLinear.from_codes(codes, scale, zp, spec.qmin, group, bias)
        module.packed()
    except (KernelError, RuntimeError) as e:
        return None, f"_weight_int4pack_mm_for_cpu refused the weight: {str(e).splitlines()[0]}"
    note = "" if spec.bits == 4 else f", {spec.bits}-bit codes in 4-bit containers"
    return module, f"aten._weight_int4pack_mm_for_cpu (group {group}{note})"
