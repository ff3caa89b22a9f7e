"""lower-int8: replace W8A8-annotated Gemm / MatMul / Conv2d nodes by modules that execute in int8.

A node is lowered when its weight spec is uniform int8 (signed, symmetric, per tensor or per output
channel), its input 0 has a calibrated per-tensor activation spec of at most 8 bits, and the target
maps it to ``int8_gemm`` or ``int8_conv``. The lowered module quantizes the raw float activation itself
(if insert-fq ran, its fake-quant node on that input is removed), so parity with the simulation is a
matter of integer accumulation (see `qgraph.kernels.int8`). A ReLU / Clip that fuse-activation marked
as fused into a Conv becomes the kernel's post-op; consecutive int8 convs pass uint8 codes.

Every node this pass is responsible for gets an entry in ``ctx.report["lowering"]``:
``{"node", "op", "kernel", "status": "lowered" | "float", "reason"}``. A lowered node keeps its
annotation under ``meta["qgraph.lowered"]`` (not ``qgraph.annotation``, so no later quantization pass
touches it again).

A dynamic activation spec (``annotate{act_dynamic=token}``) lowers a Gemm / MatMul to
`qgraph.kernels.dynamic_int8.DynamicInt8Linear`: per-token (or per-tensor) scales and int8 codes computed on
the fly, int8 x int8 -> int32 GEMM, rescaled by token scale x weight scale. Its codes are the ones the
simulation's ``qgraph::fake_quant_dynamic`` rounds to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from qgraph.errors import CalibrationError, PipelineError
from qgraph.ir.meta import (
    ANNOTATION_KEY,
    FQ_KEY,
    FUSION_KEY,
    LOWERED_FROM_KEY,
    LOWERED_KEY,
    QPARAMS_KEY,
    QWEIGHT_KEY,
)
from qgraph.kernels.dynamic_int8 import DynamicInt8Linear, is_fake_quant_dynamic
from qgraph.kernels.int8 import ActQuant, Int8Conv2d, Int8Linear, saturation_possible
from qgraph.lowering import record, snapshot_simulation, target_of, weight_layout
from qgraph.pass_base import Pass, PassResult
from qgraph.quant.qtensor import UniformWeight
from qgraph.registry import register_pass

GEMM_OPS = ("Gemm", "MatMul")


# --- helpers shared with lower-weight-only --------------------------------------------------------
def report_entry(ctx, graph, node, op: str, kernel: str, status: str, reason: str) -> None:
    record(ctx, graph.qualname(node), op, kernel, status, reason)


def no_kernel_here(graph, kernel: str) -> str:
    """Why a node stays the simulation on an IR without ``kernel`` (the torch-module kernels)."""
    return (f"an {graph.ir} graph cannot run the {kernel} kernel (a torch module); its Q/DQ simulation is what "
            f"onnxruntime fuses into int8 kernels, and qgraph.export writes it")


def is_fake_quant(node: fx.Node) -> bool:
    fn = node.target
    return node.op == "call_function" and (is_fake_quant_dynamic(fn) or fn in (
        torch.fake_quantize_per_tensor_affine, torch.ops.aten.fake_quantize_per_tensor_affine.default))


def codes_nk(qweight, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | str:
    """(codes [N, K], scale, zero point) with scales along N, or why that is impossible."""
    spec = qweight.spec
    if spec.granularity == "tensor":
        codes = qweight.codes if layout == "nk" else qweight.codes.t()
        return codes.contiguous(), qweight.scale, qweight.zero_point
    out_axis = 0 if layout == "nk" else 1
    if spec.axis % qweight.codes.dim() != out_axis:
        return (f"weight scales vary along the reduction dim (axis {spec.axis} of a "
                f"{'[K, N]' if layout == 'kn' else '[N, K]'} weight); annotate with axis={out_axis}")
    codes = qweight.codes if layout == "nk" else qweight.codes.t()
    return codes.contiguous(), qweight.scale, qweight.zero_point


def activation_source(graph, node) -> tuple[fx.Node, fx.Node | None]:
    """The raw producer of input 0 and the fake-quant node in front of it (None without insert-fq)."""
    inp = graph.inputs(node)[0]
    if is_fake_quant(inp) and graph.meta(node).get(FQ_KEY):
        return inp.args[0], inp
    return inp, None


def finish_replacement(graph, new: fx.Node, fq: fx.Node | None, kernel: str, ann, from_name: str) -> None:
    """Move the annotation out of the way of later quantization passes and name the node it stands for
    (``verify`` compares its output with that node's in the simulation)."""
    meta = graph.meta(new)
    meta.pop(ANNOTATION_KEY, None)
    meta[LOWERED_KEY] = {"kernel": kernel, "annotation": ann}
    meta[LOWERED_FROM_KEY] = from_name
    if fq is not None and not fq.users:
        graph.erase(fq)


def module_name(graph, node) -> str:
    return f"{graph.name(node)}_lowered"


# --- conv parameters and fused activations --------------------------------------------------------
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def conv_params(graph, node) -> dict[str, Any] | str:
    """stride / padding / dilation / groups of a 2-D conv node, or why it has no int8 kernel."""
    mod = graph.module_of(node)
    if mod is not None:
        if not isinstance(mod, nn.Conv2d):
            return f"{type(mod).__name__}: only 2-D convolutions have an int8 kernel (onednn qconv2d)"
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            return f"padding {mod.padding!r} / padding_mode {mod.padding_mode!r} unsupported by the int8 conv"
        return {"stride": mod.stride, "padding": mod.padding, "dilation": mod.dilation, "groups": mod.groups}
    w = graph.param(node, "weight")
    if w is None or w.dim() != 4:
        return "only 2-D convolutions have an int8 kernel (onednn qconv2d)"
    target = node.target
    name = getattr(getattr(target, "overloadpacket", target), "__name__", str(target))
    args = list(node.args)
    if name == "convolution":
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding",
                 "groups")
    else:
        names = _CONV_ARGS
    vals = {k: (args[i] if i < len(args) else node.kwargs.get(k)) for i, k in enumerate(names)}
    if vals.get("transposed"):
        return "transposed convolutions have no int8 kernel"
    if isinstance(vals.get("padding"), str):
        return f"padding={vals['padding']!r} unsupported by the int8 conv"
    return {"stride": vals.get("stride") or 1, "padding": vals.get("padding") or 0,
            "dilation": vals.get("dilation") or 1, "groups": int(vals.get("groups") or 1)}


def fused_activation(graph, node) -> tuple[fx.Node, str, tuple[float, float] | None] | None:
    """The activation that fuse-activation marked as fused into ``node``, as a oneDNN post-op."""
    pattern = graph.meta(node).get(FUSION_KEY)
    if pattern not in ("Conv+Relu", "Conv+Clip"):
        return None
    users = graph.users(node)
    if len(users) != 1:
        return None
    act = users[0]
    if graph.meta(act).get("qgraph.fused_into") != graph.name(node) or graph.inputs(act)[:1] != [node]:
        return None
    op = graph.op_type(act)
    if op == "Relu":
        return act, "relu", None
    bounds = clip_bounds(graph, act)
    return (act, "hardtanh", bounds) if bounds is not None else None


def clip_bounds(graph, act: fx.Node) -> tuple[float, float] | None:
    mod = graph.module_of(act)
    if isinstance(mod, nn.ReLU6):
        return 0.0, 6.0
    if isinstance(mod, nn.Hardtanh):
        return float(mod.min_val), float(mod.max_val)
    if act.op != "call_function":
        return None
    t = act.target
    name = getattr(getattr(t, "overloadpacket", t), "__name__", getattr(t, "__name__", ""))
    if t is F.relu6 or name in ("relu6",):
        return 0.0, 6.0
    if t is F.hardtanh or name in ("hardtanh", "hardtanh_", "clamp", "clip"):
        defaults = (-1.0, 1.0) if "hardtanh" in str(name) else (None, None)
        keys = ("min_val", "max_val") if "hardtanh" in str(name) else ("min", "max")
        lo = act.args[1] if len(act.args) > 1 else act.kwargs.get(keys[0], defaults[0])
        hi = act.args[2] if len(act.args) > 2 else act.kwargs.get(keys[1], defaults[1])
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo <= hi:
            return float(lo), float(hi)
    return None


# --- the pass ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    node: fx.Node
    op: str
    kernel: str
    module: nn.Module
    reason: str
    fused: fx.Node | None = None


@register_pass("lower-int8", after=("annotate", "calibrate", "quantize-weights", "insert-fq", "check-target"),
               requires=("annotated",), ensures=("lowered", "lowered-int8"))
class LowerInt8(Pass):
    """Lower W8A8 Gemm / MatMul / Conv2d nodes to int8 kernels (see the module docstring).

    oneDNN's u8 x s8 kernels are exact on CPUs with VNNI; on AVX2 without VNNI they sum pairs of
    products in saturating int16, which real activations overflow when 8-bit activation codes meet
    8-bit weight codes (measured on MobileNetV2: up to 42% error in a layer). So a dense conv / Gemm
    whose codes could overflow (2 (levels_x - 1) max|q_w| > 32767) is, with ``saturation=exact``
    (default), run by ``torch._int_mm`` (Gemm) or kept float (Conv, with the reason in the report);
    7-bit activations (``annotate{act_bits=7}``) or 7-bit weights (``annotate{bits=7,act_bits=8}``)
    make it exact. ``saturation=allow`` lowers it anyway. Depthwise convs never pair products, so they are
    exact at 8 bits.

    Options: ``gemm`` picks the Gemm kernel (``auto``: oneDNN where it is exact, else
    ``torch._int_mm``, which is exact but slow on CPU in torch 2.13); ``depthwise=float`` keeps
    depthwise convs in float; ``fuse`` folds marked ReLU / Clip into the conv; ``chain`` passes uint8
    codes between consecutive int8 convs instead of dequantizing and requantizing.
    """

    @dataclass(frozen=True)
    class Options:
        gemm: Literal["auto", "int_mm", "onednn"] = "auto"
        saturation: Literal["exact", "allow"] = "exact"
        depthwise: Literal["int8", "float"] = "int8"
        fuse: bool = True
        chain: bool = True

    def run(self, graph, ctx) -> PassResult:
        target = target_of(ctx)
        plans: list[_Plan] = []
        qdq: list[tuple] = []
        for node in list(graph.nodes()):
            ann = graph.meta(node).get(ANNOTATION_KEY)
            if ann is None or ann.weight is None or ann.weight.scheme != "uniform" or not ann.inputs:
                continue
            op = graph.op_type(node)
            if op not in GEMM_OPS and op != "Conv":
                continue
            plan = self._plan(graph, node, op, ann, target)
            if isinstance(plan, _Plan):
                plans.append(plan)
            elif plan[0] in ("int8_gemm", "int8_conv") and not graph.supports_kernel(plan[0]) and \
                    graph.supports_kernel("dequantize_linear"):
                qdq.append((node, op, plan[0]))  # ONNX: int8 weight codes + DequantizeLinear, onnxruntime's QDQ form
            else:
                wanted, reason = plan
                if wanted in ("int8_gemm", "int8_conv"):
                    reason = f"{wanted}: {reason}"
                report_entry(ctx, graph, node, op, "float", "float",
                             reason + ("; kept as the fake-quant simulation" if graph.meta(node).get(FQ_KEY)
                                       else ""))
        if plans or qdq:
            snapshot_simulation(graph, ctx)
        for node, op, wanted in qdq:
            ann, name = graph.meta(node).get(ANNOTATION_KEY), graph.name(node)
            new = graph.replace_with_kernel(node, "dequantize_linear", graph.meta(node).get(QWEIGHT_KEY))
            report_entry(ctx, graph, node, op, "dequantize_linear", "lowered",
                         f"{graph.ir} has no {wanted} module: int8 weight codes + DequantizeLinear after the activation "
                         f"Q/DQ, the form qgraph.export writes and onnxruntime fuses into its int8 kernels")
            finish_replacement(graph, new, None, "dequantize_linear", ann, name)
        lowered: list[fx.Node] = []
        for plan in plans:
            report_entry(ctx, graph, plan.node, plan.op, plan.kernel, "lowered", plan.reason)
            lowered.append(self._apply(graph, plan))
        chained = self._chain(graph, lowered) if self.options.chain else 0
        if plans:
            graph.recompile()
        return PassResult(graph, modified=bool(plans or qdq), stats={"lowered": len(plans) + len(qdq),
                                                                     "chained": chained})

    # -- deciding --------------------------------------------------------------------------------
    def _plan(self, graph, node, op: str, ann, target) -> _Plan | tuple[str, str]:
        name = graph.name(node)
        w_spec, a_spec = ann.weight, ann.inputs.get(0)
        if a_spec is None or set(ann.inputs) != {0}:
            return "float", ("only input 0 may be a quantized activation (activation x activation products "
                             "have no int8 kernel here)")
        qparams = graph.meta(node).get(QPARAMS_KEY, {}).get("input0")
        if qparams is None and not a_spec.dynamic:
            raise CalibrationError(f"lower-int8: node {name} is annotated for int8 activations but has no "
                                   f"calibrated qparams; run calibrate before lower-int8 (or annotate with "
                                   f"act_bits=0 for weight-only quantization and use lower-weight-only)")
        qweight = graph.meta(node).get(QWEIGHT_KEY)
        if qweight is None:
            raise PipelineError(f"lower-int8: node {name} has a weight spec but no quantized weight; run "
                                f"quantize-weights before lower-int8")
        if not isinstance(qweight, UniformWeight):
            return "float", f"no int8 kernel takes a {type(qweight).__name__}"
        kernel = target.kernel_for(op, w_spec, a_spec)
        if kernel is None and (a_spec.bits < 8 or w_spec.bits < 8):
            # narrower codes run on the 8-bit kernel unchanged
            kernel = target.kernel_for(op, w_spec.replace(bits=8), a_spec.replace(bits=8))
        if kernel not in ("int8_gemm", "int8_conv"):
            what = f"weights {w_spec} and activations {a_spec}"
            if kernel is None:
                return "float", f"target {target.name} has no kernel for {op} with {what}"
            return kernel, f"target {target.name} runs {op} with {what} on {kernel!r}, not an int8 kernel"
        if not graph.supports_kernel(kernel):
            return kernel, no_kernel_here(graph, kernel)
        problems = _spec_problems(w_spec, a_spec)
        if problems:
            return kernel, "; ".join(problems)
        if a_spec.dynamic:
            if op == "Conv":
                return kernel, "dynamic activations have no int8 conv kernel here (a dynamic spec lowers Gemm / MatMul)"
            return self._plan_dynamic(graph, node, op, qweight, a_spec, graph.param(node, "bias"))
        scale, zp = qparams
        act = ActQuant(float(scale), int(zp), a_spec.qmin, a_spec.qmax)
        bias = graph.param(node, "bias")
        if op == "Conv":
            return self._plan_conv(graph, node, qweight, act, bias)
        return self._plan_gemm(graph, node, op, qweight, act, bias)

    def _plan_conv(self, graph, node, qweight, act: ActQuant, bias) -> _Plan | tuple[str, str]:
        params = conv_params(graph, node)
        if isinstance(params, str):
            return "int8_conv", params
        codes = qweight.codes
        depthwise = params["groups"] > 1 and codes.shape[1] == 1
        if depthwise and self.options.depthwise == "float":
            return "int8_conv", "depthwise conv kept float (lower-int8{depthwise=float})"
        post_op, clamp, fused = "none", None, None
        found = fused_activation(graph, node) if self.options.fuse else None
        if found is not None:
            fused, post_op, clamp = found
        saturates = not depthwise and saturation_possible(act.levels, _absmax(codes))
        if saturates and self.options.saturation == "exact":
            return "int8_conv", _SATURATION_HINT
        module = Int8Conv2d(codes, qweight.scale, bias, act, post_op=post_op, clamp=clamp, **params)
        reason = "onednn qconv2d u8 x s8 -> int32" + _bits_note(qweight.spec, act)
        if fused is not None:
            reason += f", fused {graph.op_type(fused)}"
        if saturates:
            reason += "; may saturate int16 pair sums on this CPU (saturation=allow)"
        return _Plan(node, "Conv", "int8_conv", module, reason, fused)

    def _plan_gemm(self, graph, node, op: str, qweight, act: ActQuant, bias) -> _Plan | tuple[str, str]:
        got = _gemm_codes(graph, node, op, qweight)
        if isinstance(got, str):
            return "int8_gemm", got
        codes, scale, _ = got
        saturates = saturation_possible(act.levels, _absmax(codes))
        impl = self.options.gemm
        if impl == "auto":
            impl = "int_mm" if saturates and self.options.saturation == "exact" else "onednn"
        module = Int8Linear(codes, scale, bias, act, impl=impl)
        reason = ("torch._int_mm int8 x int8 -> int32 (exact)" if impl == "int_mm"
                  else "onednn qlinear u8 x s8 -> int32") + _bits_note(qweight.spec, act)
        if impl == "onednn" and saturates:
            reason += "; may saturate int16 pair sums on this CPU (AVX2 without VNNI)"
        return _Plan(node, op, "int8_gemm", module, reason)

    def _plan_dynamic(self, graph, node, op: str, qweight, a_spec, bias) -> _Plan | tuple[str, str]:
        got = _gemm_codes(graph, node, op, qweight)
        if isinstance(got, str):
            return "int8_gemm", got
        codes, scale, _ = got
        impl = {"auto": "auto", "int_mm": "int_mm", "onednn": "onednn"}[self.options.gemm]
        if impl == "onednn" and not a_spec.symmetric:
            impl = "int_mm"
        module = DynamicInt8Linear(codes, scale, bias, a_spec, impl=impl)
        what = "per-token" if a_spec.granularity == "token" else "per-tensor"
        reason = (f"dynamic {what} int{a_spec.bits} activations, "
                  + ("onednn qlinear u8 x s8 -> int32" if module.impl == "onednn" else "torch._int_mm int8 x int8 -> int32")
                  + ", rescaled by token x weight scales")
        return _Plan(node, op, "int8_gemm", module, reason)

    # -- rewriting -------------------------------------------------------------------------------
    def _apply(self, graph, plan: _Plan) -> fx.Node:
        node = plan.node
        ann = graph.meta(node).get(ANNOTATION_KEY)
        from_name = graph.name(plan.fused if plan.fused is not None else node)
        src, fq = activation_source(graph, node)
        new = graph.replace_with_module(node, plan.module, module_name(graph, node), inputs=[src])
        if plan.fused is not None:
            plan.fused.replace_all_uses_with(new)
            graph.erase(plan.fused)
        finish_replacement(graph, new, fq, plan.kernel, ann, from_name)
        return new

    def _chain(self, graph, lowered: list[fx.Node]) -> int:
        """Let an int8 conv whose only consumer is another int8 conv hand it uint8 codes."""
        chained = 0
        for node in lowered:
            consumer = graph.module_of(node)
            if not isinstance(consumer, Int8Conv2d) or consumer.input_quantized:
                continue
            producer = node.args[0]
            if not isinstance(producer, fx.Node) or len(producer.users) != 1:
                continue
            pmod = graph.module_of(producer)
            if not isinstance(pmod, Int8Conv2d) or pmod.output_act is not None:
                continue
            pmod.emit_codes(consumer.act)
            consumer.input_quantized = True
            chained += 1
        return chained


_SATURATION_HINT = ("8-bit activation x 8-bit weight codes would saturate oneDNN's int16 pair sums on this CPU "
                    "(AVX2 without VNNI); use 7-bit activations (annotate{act_bits=7}) or 7-bit weights "
                    "(annotate{bits=7,act_bits=8}) to run it in int8 exactly, or lower-int8{saturation=allow}")


def _absmax(codes: torch.Tensor) -> int:
    return int(codes.to(torch.int16).abs().max()) if codes.numel() else 0


def _bits_note(w, act: ActQuant) -> str:
    a_bits = (act.levels - 1).bit_length()
    return "" if w.bits == 8 and a_bits == 8 else f" (W{w.bits}A{a_bits} codes on the 8-bit kernel)"


def _spec_problems(w, a) -> list[str]:
    out = []
    if not w.signed:
        out.append(f"int8 kernels take signed weight codes, got {w}")
    if not w.symmetric:
        out.append("asymmetric weights unsupported by the int8 kernels (weight zero point must be 0)")
    if w.granularity == "group":
        out.append("group-wise weight scales have no int8 GEMM/conv kernel (use per-channel)")
    if a.granularity != "tensor" and not (a.dynamic and a.granularity == "token"):
        out.append(f"activations must be quantized per tensor (or dynamically per token), got {a.granularity}")
    if a.dynamic and not a.signed:
        out.append(f"dynamic activations take signed codes, got {a}")
    if a.bits > 8:
        out.append(f"activations of {a.bits} bits do not fit the int8 kernels")
    return out


def _gemm_codes(graph, node, op: str, qweight):
    """``(codes [N, K], scale, zero point)`` of a Gemm/MatMul weight, or why the int8 GEMM cannot take it."""
    layout = weight_layout(graph, node, op)
    if layout is None:
        return "only a constant 2-D weight operand has an int8 GEMM kernel"
    return codes_nk(qweight, layout)
