"""multipoint: multipoint quantization of annotated uniform weights (`qgraph.quant.multipoint`).

Each annotated Gemm / MatMul / Conv weight with a uniform spec keeps its ordinary quantization as point 1
(the `UniformWeight` an earlier pass such as ``clip-search`` or ``gptq`` left in ``meta["qgraph.qweight"]``,
else round-to-nearest as ``quantize-weights`` would do it) and gets up to ``max_points − 1`` further
low-bit points on the output channels that need them most. Channel c's output error with k points is
``Σ (op(x, w − ŵ_k))²[c]`` over the calibration inputs x of the layer (float model; ``error=weight``:
``‖w_c − ŵ_{c,k}‖²`` without data). ``extra`` × channels extra points per layer go, one at a time, to the
channel with the largest current error (only while its next point lowers it). The result, a
`MultipointWeight`, goes to ``meta["qgraph.qweight"]`` (quantize-weights then skips the node; insert-fq
uses its ``dequantize()``). No kernel runs multipoint weights: lower-int8 / lower-weight-only leave these
nodes as the float simulation (their report says so), and the stats say ``lowering: float-simulated``.
BCQ-annotated weights are left alone (a note); a graph with only BCQ weights is a SpecError.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from qgraph.errors import CalibrationError, SpecError
from qgraph.ir.inputs import batches
from qgraph.ir.meta import ANNOTATION_KEY, QWEIGHT_KEY
from qgraph.pass_base import NON_NEGATIVE, POSITIVE, POSITIVE_INT, Pass, PassResult, optional, validate
from qgraph.passes.lower_int8 import conv_params
from qgraph.passes.quantize_weights import quantize_tensor
from qgraph.progress import progress
from qgraph.quant.multipoint import MultipointWeight, greedy_counts, residual_points
from qgraph.quant.qtensor import UniformWeight
from qgraph.registry import register_pass

LAYER_OPS = ("Gemm", "MatMul", "Conv")


@register_pass("multipoint", after=("annotate", "calibrate", "clip-search", "gptq"),
               before=("quantize-weights", "insert-fq"), requires=("annotated",))
class Multipoint(Pass):
    """Give the worst output channels extra low-bit points (see the module docstring).

    ``extra``: extra points per layer as a fraction of its output channels (the average number of extra
    points per channel); ``max_points``: points per channel at most; ``clip_search`` / ``p``: Lp clip search
    for point 1 when no earlier pass quantized the weight; ``error``: output (calibration data) or weight.
    """

    @dataclass(frozen=True)
    class Options:
        extra: float = 0.25
        max_points: int = 3
        error: Literal["output", "weight"] = "output"
        clip_search: bool = False
        p: float = 2.4
        max_batches: int | None = 4

        def __post_init__(self):
            validate(self, extra=NON_NEGATIVE, max_points=POSITIVE_INT, p=POSITIVE, max_batches=optional(POSITIVE_INT))

    def run(self, graph, ctx) -> PassResult:
        o = self.options
        todo, notes, bcq = self._select(graph)
        if not todo:
            if bcq:
                raise SpecError("multipoint approximates uniform weights by sums of uniform low-bit points; every "
                                "annotated weight here is BCQ (already a sum of binary planes): annotate with a "
                                "uniform scheme (annotate{bits=4}) or drop multipoint")
            return PassResult(graph, modified=False, preserved=frozenset({"*"}), stats={"layers": 0})
        data = None
        if o.error == "output":
            if ctx.calibration is None:
                raise CalibrationError("multipoint{error=output} measures channel output errors on calibration "
                                       "data: pass calib=[batch, ...] to qgraph.quantize, or use "
                                       "multipoint{error=weight}")
            data = list(batches(ctx.calibration, graph, o.max_batches))
            if not data:
                raise CalibrationError("calibration data is empty: give at least one batch")
        bar = iter(progress(range(len(todo)), desc="multipoint", enabled=ctx.progress, unit="layer"))
        plans = []
        for node, spec, axis, base in todo:
            w = graph.param(node, "weight").detach().to(torch.float32)
            if base is None:
                base = quantize_tensor(w, spec, clip_search=o.clip_search, p=o.p)
            points = residual_points(w, base, axis, o.max_points - 1)
            plans.append(_Plan(node, w, axis, base, points, _layer_fn(graph, node)))
        measured = self._errors(graph, plans, data)
        layers = ctx.report.setdefault("layers", [])
        total_extra = total_channels = nbytes = rtn_bytes = 0
        for plan in plans:
            errors = plan.errors if plan.errors is not None else plan.weight_errors()
            c = errors.shape[1]
            counts = greedy_counts(errors, round(o.extra * c))
            q = MultipointWeight.build(plan.base, plan.points, counts, plan.axis)
            graph.meta(plan.node)[QWEIGHT_KEY] = q
            next(bar, None)
            total_extra += int(counts.sum())
            nbytes += int(q.nbytes)
            rtn_bytes += int(plan.base.nbytes)
            total_channels += c
            e0 = float(errors[0].sum())
            e1 = float(errors.gather(0, counts[None]).sum())
            w = plan.w
            layers.append({"node": graph.qualname(plan.node), "op": graph.op_type(plan.node), "spec": str(q.spec),
                           "method": "multipoint", "error": "output" if plan.errors is not None else "weight",
                           "rel_weight_err": float((q.dequantize() - w).norm() / w.norm().clamp_min(1e-30)),
                           "rel_weight_err_rtn": float((plan.base.dequantize().reshape(w.shape) - w).norm()
                                                       / w.norm().clamp_min(1e-30)),
                           "error_ratio": e1 / e0 if e0 > 0 else 0.0, "avg_points": 1 + float(counts.float().mean()),
                           "fp32_bytes": w.numel() * 4, "bytes": int(q.nbytes), "rtn_bytes": int(plan.base.nbytes)})
        if notes:
            ctx.report.setdefault("multipoint", {})["notes"] = notes
        stats = {"layers": len(plans), "extra_points": total_extra,
                 "avg_points": 1 + total_extra / max(1, total_channels), "output_error_layers": measured,
                 "bytes": nbytes, "rtn_bytes": rtn_bytes, "lowering": "float-simulated"}
        return PassResult(graph, modified=True, preserved=frozenset({"*"}), stats=stats)

    def _select(self, graph):
        todo, notes, bcq = [], [], 0
        for node in graph.nodes():
            meta = graph.meta(node)
            ann = meta.get(ANNOTATION_KEY)
            if ann is None or ann.weight is None:
                continue
            name, op = graph.qualname(node), graph.op_type(node)
            if op not in LAYER_OPS:
                continue
            if ann.weight.scheme != "uniform":
                bcq += 1
                notes.append(f"{name}: {ann.weight} is BCQ; left to quantize-weights")
                continue
            have = meta.get(QWEIGHT_KEY)
            if have is not None and not isinstance(have, UniformWeight):
                notes.append(f"{name}: already holds a {type(have).__name__}; left as it is")
                continue
            layout = graph.weight_layout(node)
            if layout is None:
                notes.append(f"{name}: weight layout of this {op} is not [out, in] / [in, out]; left as it is")
                continue
            todo.append((node, ann.weight, 0 if layout == "nk" else 1, have))
        return todo, notes, bcq

    def _errors(self, graph, plans, data) -> int:
        """Fill ``plan.errors`` ([P, C] output errors) for the plans whose op can run on a weight difference."""
        live = [p for p in plans if p.fn is not None] if data is not None else []
        if not live:
            return 0
        deltas = [p.deltas() for p in live]
        for p in live:
            p.errors = torch.zeros(len(p.points) + 1, p.w.shape[p.axis], dtype=torch.float64)

        def on_value(i, x):
            p = live[i]
            fn, ch = p.fn
            x = x.to(torch.float32)
            for k, d in enumerate(deltas[i]):
                y = fn(x, d)
                dims = [j for j in range(y.dim()) if j != ch % y.dim()]
                p.errors[k] += y.double().square().sum(dim=dims)

        graph.collect([(p.node, 0) for p in live], data, on_value)
        return len(live)


@dataclass
class _Plan:
    node: object
    w: torch.Tensor
    axis: int
    base: UniformWeight
    points: list
    fn: tuple | None
    errors: torch.Tensor | None = None

    def deltas(self) -> list[torch.Tensor]:
        """w − ŵ_k for k = 1..P points on every channel."""
        w_hat = self.base.dequantize().reshape(self.w.shape).to(torch.float32)
        out = [self.w - w_hat]
        rows = w_hat.movedim(self.axis, 0).reshape(w_hat.shape[self.axis], -1).clone()
        for codes, scale in self.points:
            rows += scale[:, None] * codes.to(torch.float32)
            moved = list(self.w.shape)
            moved.insert(0, moved.pop(self.axis))
            out.append(self.w - rows.reshape(moved).movedim(0, self.axis))
        return out

    def weight_errors(self) -> torch.Tensor:
        return torch.stack([d.movedim(self.axis, 0).reshape(d.shape[self.axis], -1).double().square().sum(1)
                            for d in self.deltas()])


def _layer_fn(graph, node):
    """``(fn(x, delta_w) -> y, channel dim of y)`` computing the node's op without bias, or None."""
    op = graph.op_type(node)
    if graph.is_linear(node):
        return (lambda x, d: F.linear(x, d)), -1
    if graph.ir != "fx":
        return None  # convolutions and matmuls are replayed from torch modules / aten arguments
    mod = graph.module_of(node)
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return (lambda x, d: mod._conv_forward(x, d, None)), 1
    if getattr(node, "op", None) != "call_function":
        return None
    layout = graph.weight_layout(node)
    if op == "Gemm":
        return ((lambda x, d: F.linear(x, d)) if layout == "nk" else (lambda x, d: x @ d)), -1
    if op == "MatMul" and layout == "kn":
        return (lambda x, d: torch.matmul(x, d)), -1
    if op == "Conv":
        params = conv_params(graph, node)
        if isinstance(params, dict):
            return (lambda x, d: F.conv2d(x, d, None, **params)), 1
    return None
