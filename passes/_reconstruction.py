"""What the reconstruction passes (adaround, brecq) share: which nodes learn their rounding, how a layer's
inputs become rows of its weight's dot products, the activation fake-quant of the quantized model, and the
round-to-nearest fallback for the other annotated weights.

Learned rounding takes annotated weights with a uniform spec on ``y = x Wᵀ`` layers (nn.Linear,
F.linear, aten.linear) and 1-d / 2-d convolutions with zero padding (modules, F.conv*, aten.conv* /
aten.convolution). Other annotated weights (MatMul / addmm layouts, embeddings, 3-d or padded-mode
convolutions) get round-to-nearest, so the graph leaves these passes fully weight-quantized. Each layer's
row extraction is checked once against the layer's real output on one calibration sample.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qgraph.errors import CalibrationError, SpecError
from qgraph.ir.inputs import batches
from qgraph.ir.meta import ANNOTATION_KEY, QPARAMS_KEY, QWEIGHT_KEY
from qgraph.pass_base import FRACTION, NON_NEGATIVE, POSITIVE
from qgraph.passes.quantize_weights import dequantized, quantize_tensor
from qgraph.quant.adaround import LayerInputStats, adaround, relative

#: Ranges of the learned-rounding options adaround and brecq share (``qgraph.quant.adaround.check_options``).
LEARNED_ROUNDING_RULES = {"iters": NON_NEGATIVE, "lr": POSITIVE, "reg": NON_NEGATIVE, "warmup": FRACTION}

_CHUNK_ELEMS = 1 << 25  # floats of unfolded patches per chunk


@dataclass(frozen=True)
class LayerOp:
    """How to turn the input of a layer into columns ``[B, G, K, L]`` whose dot products (over ``K``) with the
    weight viewed as ``[G, out/G, K]`` are the layer's outputs at ``B × L`` positions (bias aside): a Linear's
    rows, a convolution's patches (``F.unfold``; a plain reshape for pointwise convolutions)."""

    kind: str  # "linear" | "conv"
    groups: int = 1
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()

    def cols(self, x: torch.Tensor):
        """Columns of ``x`` in chunks (a generator of ``[b, G, K, L]`` tensors, views where possible)."""
        if self.kind == "linear":
            rows = x.reshape(-1, x.shape[-1])
            yield rows.T.reshape(1, 1, rows.shape[1], rows.shape[0])
            return
        if self._pointwise():
            yield x.reshape(x.shape[0], self.groups, x.shape[1] // self.groups, -1)
            return
        k = 1
        for d in self.kernel:
            k *= d
        per = max(1, _CHUNK_ELEMS // max(1, x[:1].numel() * k))
        for i in range(0, x.shape[0], per):
            cols = self._unfold(x[i : i + per])  # [n, C*k, L]
            yield cols.reshape(cols.shape[0], self.groups, cols.shape[1] // self.groups, cols.shape[2])

    def positions(self, x: torch.Tensor) -> int:
        """Input vectors per sample (output positions of a convolution; rows per leading index of a Linear)."""
        if self.kind == "linear":
            return x[:1].numel() // x.shape[-1] if x.dim() > 1 else 1
        if self._pointwise():
            return x[:1, :1].numel()
        out = 1
        for i, (k, st, d) in enumerate(zip(self.kernel, self.stride, self.dilation)):
            size = x.shape[2 + i]
            pad = 0 if self.padding == "valid" else (d * (k - 1) if self.padding == "same" else 2 * self.padding[i])
            out *= (size + pad - d * (k - 1) - 1) // st + 1
        return out

    def _pointwise(self) -> bool:
        pad = self.padding
        return all(k == 1 for k in self.kernel) and all(s == 1 for s in self.stride) and (
            pad in ("valid", "same") or all(p == 0 for p in pad))

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        kernel, stride, dilation, padding = self.kernel, self.stride, self.dilation, self.padding
        if len(kernel) == 1:  # conv1d as a 1 x k conv2d
            x = x.unsqueeze(-2)
            kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
            padding = padding if isinstance(padding, str) else (0, *padding)
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            pads = []
            for k, d in zip(reversed(kernel), reversed(dilation)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
            padding = (0, 0)
        return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)

    def outputs_as_cols(self, y: torch.Tensor) -> torch.Tensor:
        """The layer output ``y`` as ``[B, out, L]``, matching `cols`."""
        if self.kind == "linear":
            rows = y.reshape(-1, y.shape[-1])
            return rows.T.reshape(1, rows.shape[1], rows.shape[0])
        return y.reshape(y.shape[0], y.shape[1], -1)


def _tuple(v, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(i) for i in v)
    return v * n if len(v) == 1 else v


_CONV_NAMES = ("conv1d", "conv2d", "convolution")


def layer_op(graph, node) -> tuple[LayerOp | None, str]:
    """The `LayerOp` of ``node``, or None and why learned rounding cannot take it."""
    op = graph.op_type(node)
    w = graph.param(node, "weight")
    if w is None:
        return None, "no constant weight"
    if op == "Gemm":
        mod = graph.module_of(node) if node.op == "call_module" else None
        target = getattr(node, "target", None)
        if isinstance(mod, nn.Linear) or target is F.linear or "aten.linear" in str(target):
            return (LayerOp("linear"), "") if w.dim() == 2 else (None, "weight is not a matrix")
        return None, "only y = x Wᵀ layouts (nn.Linear, F.linear, aten.linear) learn their rounding"
    if op != "Conv":
        return None, f"{op} is not a Linear or a convolution"
    if node.op == "call_module":
        mod = graph.module_of(node)
        if not isinstance(mod, (nn.Conv1d, nn.Conv2d)) or isinstance(mod, nn.modules.conv._ConvTransposeNd):
            return None, f"{type(mod).__name__} is not a Conv1d / Conv2d"
        if mod.padding_mode != "zeros":
            return None, f"padding_mode={mod.padding_mode!r} (only zero padding)"
        nd = w.dim() - 2
        pad = mod.padding if isinstance(mod.padding, str) else _tuple(mod.padding, nd)
        return LayerOp("conv", mod.groups, tuple(w.shape[2:]), _tuple(mod.stride, nd), pad,
                       _tuple(mod.dilation, nd)), ""
    name = str(getattr(node.target, "__name__", node.target))
    if not any(c in name for c in _CONV_NAMES) or "3d" in name:
        return None, f"{name} is not a 1-d / 2-d convolution"
    nd = w.dim() - 2
    if nd not in (1, 2):
        return None, f"{nd}-d convolution"
    args, kw = list(node.args), dict(node.kwargs)
    if "convolution" in name:  # aten.convolution(input, weight, bias, stride, padding, dilation, transposed, ...)
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding",
                 "groups")
    else:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    vals = dict(zip(names, args))
    vals.update(kw)
    if vals.get("transposed", False):
        return None, "transposed convolution"
    pad = vals.get("padding", 0)
    pad = pad if isinstance(pad, str) else _tuple(pad, nd)
    return LayerOp("conv", int(vals.get("groups", 1)), tuple(w.shape[2:]), _tuple(vals.get("stride", 1), nd), pad,
                   _tuple(vals.get("dilation", 1), nd)), ""


@dataclass
class Selection:
    targets: list  # (node, spec, LayerOp)
    rest: list  # (node, spec): round-to-nearest
    notes: list[str]


def select(graph, pass_name: str) -> Selection:
    """Annotated, not yet quantized weights: learned-rounding targets and round-to-nearest rest.
    BCQ specs raise `SpecError` (learned rounding is defined on a uniform grid)."""
    targets, rest, notes = [], [], []
    for node in graph.nodes():
        meta = graph.meta(node)
        ann = meta.get(ANNOTATION_KEY)
        if ann is None or ann.weight is None or QWEIGHT_KEY in meta:
            continue
        spec = ann.weight
        if spec.scheme != "uniform":
            raise SpecError(f"{pass_name} learns rounding on a uniform integer grid, but {graph.qualname(node)} "
                            f"is annotated {spec}: use gptq (it takes the BCQ quantizer) or quantize-weights "
                            f"for BCQ weights")
        lop, why = layer_op(graph, node)
        if lop is None:
            notes.append(f"{graph.qualname(node)}: {why}; round-to-nearest")
            rest.append((node, spec))
        else:
            targets.append((node, spec, lop))
    return Selection(targets, rest, notes)


def calibration(ctx, graph, pass_name: str, max_batches: int | None) -> list[tuple]:
    if ctx.calibration is None:
        raise CalibrationError(f"{pass_name} needs calibration data: pass calib=[batch, ...] to qgraph.quantize "
                               f"(or set PassContext.calibration), or use quantize-weights (round-to-nearest)")
    data = list(batches(ctx.calibration, graph, max_batches))
    if not data:
        raise CalibrationError("calibration data is empty: give at least one batch")
    return data


def round_rest(graph, rest, layers: list) -> None:
    """Round-to-nearest for the annotated weights learned rounding does not take."""
    for node, spec in rest:
        w = graph.param(node, "weight").detach()
        q = quantize_tensor(w, spec)
        graph.meta(node)[QWEIGHT_KEY] = q
        err = float((dequantized(q, w) - w).norm() / w.norm().clamp_min(1e-30))
        layers.append({"node": graph.qualname(node), "op": graph.op_type(node), "spec": str(spec),
                       "method": "rtn", "rel_weight_err": err, "fp32_bytes": w.numel() * 4,
                       "bytes": int(q.nbytes)})


def quantized_weights(graph) -> dict:
    """Dequantized weights of every node that already has a quantized weight (the quantized model's)."""
    out = {}
    for node in graph.nodes():
        q = graph.meta(node).get(QWEIGHT_KEY)
        if q is not None:
            w = graph.param(node, "weight")
            out[node] = dequantized(q, w)
    return out


def fake_quant_inputs(graph, notes: list[str]) -> dict:
    """Per node, the inputs ``insert-fq`` will fake-quantize: ``{node: {producer: (scale, zp, qmin, qmax)}}``."""
    out: dict = {}
    missing = 0
    for node in graph.nodes():
        ann = graph.meta(node).get(ANNOTATION_KEY)
        if ann is None or not ann.inputs:
            continue
        qparams = graph.meta(node).get(QPARAMS_KEY, {})
        for idx, spec in sorted(ann.inputs.items()):
            if f"input{idx}" not in qparams or spec.granularity != "tensor":
                missing += 1
                continue
            scale, zp = qparams[f"input{idx}"]
            producer = graph.inputs(node)[idx]
            out.setdefault(node, {})[producer] = (float(scale), int(zp), spec.qmin, spec.qmax)
    if missing:
        notes.append(f"{missing} quantized activation input(s) have no per-tensor qparams (run calibrate first): "
                     f"their rounding is learned without activation quantization")
    return out


def check_rows(graph, node, lop: LayerOp, x: torch.Tensor, y: torch.Tensor) -> str:
    """'' if the columns of one sample of ``x`` times the weight reproduce ``y`` (that sample's layer output)."""
    w = graph.param(node, "weight").detach().float()
    b = graph.param(node, "bias")
    try:
        one = x[:1].detach().float() if lop.kind == "conv" else x.detach().float().reshape(-1, x.shape[-1])[:64]
        ref = lop.outputs_as_cols(y[:1].detach().float() if lop.kind == "conv"
                                  else y.detach().float().reshape(-1, y.shape[-1])[:64])
        cols = torch.cat(list(lop.cols(one)))
        g = lop.groups
        out = torch.einsum("bgkl,gok->bgol", cols, w.reshape(g, w.shape[0] // g, -1))
        out = out.reshape(out.shape[0], -1, out.shape[-1])
        if b is not None:
            out = out + b.detach().float()[:, None]
    except Exception as e:  # noqa: BLE001  (any failure means: do not trust the columns)
        return f"input columns could not be formed ({type(e).__name__}: {e})"
    if out.shape != ref.shape:
        return f"input columns give outputs of shape {tuple(out.shape)}, the layer {tuple(ref.shape)}"
    tol = 1e-3 * float(ref.abs().max().clamp_min(1e-6))
    if not torch.allclose(out, ref, rtol=1e-3, atol=tol):
        return "input columns do not reproduce the layer output"
    return ""


def stats_cols(lop: LayerOp, x_float: torch.Tensor, x_quant: torch.Tensor | None, every: int = 1):
    """``(x_hat columns, err columns or None)`` chunk by chunk, keeping every ``every``-th position; ``x_quant``
    None means the layer sees ``x_float``. The error is formed on the input (columns are linear in it)."""
    if x_quant is None:
        for c in lop.cols(x_float.float()):
            yield c[..., ::every], None
        return
    x_quant = x_quant.float()
    for c, e in zip(lop.cols(x_quant), lop.cols(x_quant - x_float.float())):
        yield c[..., ::every], e[..., ::every]


def position_stride(lop: LayerOp, xs: list[torch.Tensor], max_rows: int) -> int:
    """Keep every how-many-th position so that a layer's statistics use at most ``max_rows`` input vectors
    (0: all)."""
    if not max_rows:
        return 1
    per = lop.positions(xs[0])
    total = sum(per * (x.shape[0] if x.dim() > 1 else 1) for x in xs)
    return max(1, -(-total // max_rows))


def learn_layer(graph, ls, node, spec, lop: LayerOp, fq: dict, notes: list[str], o) -> dict:
    """AdaRound one layer at the point ``ls`` has reached it (its inputs are in both environments): exact
    statistics of its inputs (every k-th position so that at most ``o.max_rows`` are used), learned rounding
    (options ``o``: iters, lr, reg, warmup, clip_search, p, keep_best), the result stored, and the layer
    stepped in ``ls``. Returns the layer's report row."""
    t0 = time.perf_counter()
    producer = graph.inputs(node)[0]
    xs_f = ls.values(producer, "float")
    xs_q = ls.values(producer, "quant") if ls.quantized else [None] * len(xs_f)
    act = fq.get(producer)
    w = graph.param(node, "weight").detach()
    stats = LayerInputStats(lop.groups, w[0].numel())  # weight viewed as [G, out/G, K]
    every = position_stride(lop, xs_f, o.max_rows)
    for xf, xq in zip(xs_f, xs_q):
        if act is not None:
            xq = torch.fake_quantize_per_tensor_affine(xq if xq is not None else xf, *act)
        for cols, err in stats_cols(lop, xf, xq, every):
            stats.add(cols, err)
    ls.step_float(node)
    why = check_rows(graph, node, lop, xs_f[0], ls.float_envs[0][node])
    name = graph.qualname(node)
    if why:
        notes.append(f"{name}: {why}; round-to-nearest")
        round_rest(graph, [(node, spec)], [])
        q = graph.meta(node)[QWEIGHT_KEY]
        ls.weights[node] = dequantized(q, w)
        ls.step_quant(node)
        return {"node": name, "op": graph.op_type(node), "spec": str(spec), "method": "rtn",
                "fp32_bytes": w.numel() * 4, "bytes": int(q.nbytes)}
    res = adaround(w, spec, stats, iters=o.iters, lr=o.lr, reg=o.reg, warmup=o.warmup,
                   clip_search=o.clip_search, p=o.p, keep_best=o.keep_best)
    graph.meta(node)[QWEIGHT_KEY] = res.qweight
    ls.weights[node] = res.w_hat.reshape(w.shape).to(w.dtype)
    ls.step_quant(node)
    rel_w = float((res.w_hat.reshape(w.shape) - w).norm() / w.norm().clamp_min(1e-30))
    return {"node": name, "op": graph.op_type(node), "spec": str(spec), "method": "adaround",
            "rel_weight_err": rel_w, "rtn_output_err": res.rtn_error, "output_err": res.error,
            "rel_rtn_output_err": relative(res.rtn_error, res.energy),
            "rel_output_err": relative(res.error, res.energy), "flipped": res.flipped,
            "kept_rtn": res.kept_rtn, "rows": stats.n, "seconds": time.perf_counter() - t0,
            "fp32_bytes": w.numel() * 4, "bytes": int(res.qweight.nbytes)}
