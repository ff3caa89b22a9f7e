"""Uniform (integer) quantization: qparams, quantize, dequantize, fake-quantize, weight quantization.

Shapes of ``scale`` / ``zero_point`` ("reduced shape") by granularity:
- ``tensor``: 0-d; ``channel``: ``[C]`` with ``C = x.shape[axis]``;
- ``group``: ``[C, G]``: ``x`` viewed as ``[C, K]`` (``axis`` first, other dims flattened in order), each
  row cut into ``G = K / group_size`` groups. For a Linear weight ``[out, in]`` (axis 0) groups run along
  ``in_features``.

Formulas (q = integer code, s = scale, z = zero point, [qmin, qmax] from the spec):
- symmetric signed: ``s = max(|min|, |max|) / ((qmax - qmin) / 2)``, ``z = 0`` (PyTorch's convention);
- symmetric unsigned: ``s = max(max, 0) / qmax``, ``z = 0`` (negative values clip to 0);
- affine: the range is widened to include 0, ``s = (max - min) / (qmax - qmin)``,
  ``z = qmin - round(min / s)``;
- ``pow2_scale``: s is rounded *up* to a power of two (the clip range only grows), z recomputed;
- ``quantize``: ``q = clamp(round(x / s) + z, qmin, qmax)`` (round half to even, as ONNX QuantizeLinear).
Scales are float32 (floored at ``SCALE_EPS``), zero points int32, codes int8 (signed) or uint8 (unsigned).
A round trip moves a value inside ``[s (qmin - z), s (qmax - z)]`` by at most ``s / 2``.
Matches ``torch.fake_quantize_per_{tensor,channel}_affine`` except at exact .5 ties (torch multiplies by
1/s). Clip search and BCQ run their many small ops on `chunk_parallel` (see there).
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import torch

from qgraph.errors import SpecError
from qgraph.quant.qspec import QSpec

SCALE_EPS = 1e-12


def _require_uniform(spec: QSpec) -> None:
    if spec.scheme != "uniform":
        raise SpecError(f"uniform quantization got a {spec.scheme!r} spec ({spec}); use qgraph.quant.bcq for bcq")


def to_rows(x: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """View ``x`` as ``[C, K]`` with ``axis`` first (the layout channel and group granularity reduce over)."""
    return x.movedim(spec.axis, 0).reshape(x.shape[spec.axis], -1)


def _to_groups(x: torch.Tensor, spec: QSpec) -> torch.Tensor:
    rows = to_rows(x, spec)
    return rows.reshape(rows.shape[0], -1, spec.group_size)


def _from_groups(g: torch.Tensor, like: torch.Tensor, spec: QSpec) -> torch.Tensor:
    moved_shape = like.movedim(spec.axis, 0).shape
    return g.reshape(moved_shape).movedim(0, spec.axis)


def reduced_shape(shape: tuple[int, ...] | torch.Size, spec: QSpec) -> tuple[int, ...]:
    """Shape of scale / zero point for a tensor of ``shape`` under ``spec``."""
    spec.check_tensor(shape)
    if spec.granularity == "tensor":
        return ()
    c = int(shape[spec.axis])
    if spec.granularity == "channel":
        return (c,)
    k = 1
    for s in shape:
        k *= int(s)
    return (c, (k // c if c else 0) // spec.group_size)


def min_max(x: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-granularity minimum and maximum of ``x`` (float32, reduced shape)."""
    spec.check_tensor(x.shape)
    x = x.detach().to(torch.float32)
    if spec.granularity == "tensor":
        return x.min(), x.max()
    if spec.granularity == "channel":
        rows = to_rows(x, spec)
        return rows.amin(dim=1), rows.amax(dim=1)
    g = _to_groups(x, spec)
    return g.amin(dim=2), g.amax(dim=2)


def compute_qparams(
    min_val: torch.Tensor | float, max_val: torch.Tensor | float, spec: QSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) from a range; elementwise over any shape of min/max."""
    _require_uniform(spec)
    lo = torch.as_tensor(min_val, dtype=torch.float32)
    hi = torch.as_tensor(max_val, dtype=torch.float32)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise SpecError("compute_qparams got a non-finite min/max; check the calibration data for inf/nan")
    qmin, qmax = spec.qmin, spec.qmax
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if spec.symmetric:
        if spec.signed:
            scale = torch.maximum(-lo, hi) / ((qmax - qmin) / 2)
        else:
            scale = hi / qmax
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = scale.clamp_min(SCALE_EPS)
    if spec.pow2_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    if spec.symmetric:
        zp = torch.zeros_like(scale, dtype=torch.int32)
    else:
        zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zp


def _broadcast(p: torch.Tensor, x: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Reshape a reduced-shape parameter so it broadcasts against ``x`` (tensor / channel granularity)."""
    if spec.granularity == "tensor":
        if p.numel() != 1:
            raise SpecError(f"per-tensor qparams must hold one value, got shape {tuple(p.shape)}")
        return p.reshape(())
    c = x.shape[spec.axis]
    if p.shape != (c,):
        raise SpecError(f"per-channel qparams must have shape ({c},) for axis {spec.axis}, got {tuple(p.shape)}")
    shape = [1] * x.dim()
    shape[spec.axis] = c
    return p.reshape(shape)


def _apply(fn, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Run ``fn(x, scale, zp)`` with scale / zp broadcast to ``x`` under the spec's granularity."""
    _require_uniform(spec)
    spec.check_tensor(x.shape)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    zp = torch.as_tensor(zp, device=x.device)
    if spec.granularity != "group":
        return fn(x, _broadcast(scale, x, spec), _broadcast(zp, x, spec))
    g = _to_groups(x, spec)
    if scale.shape != g.shape[:2] or zp.shape != g.shape[:2]:
        raise SpecError(
            f"grouped qparams must have shape {tuple(g.shape[:2])} for x of shape {tuple(x.shape)}, "
            f"got scale {tuple(scale.shape)} and zero point {tuple(zp.shape)}"
        )
    return _from_groups(fn(g, scale.unsqueeze(-1), zp.unsqueeze(-1)), x, spec)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Integer codes of ``x``: int8 for signed specs, uint8 for unsigned ones."""
    dtype = torch.int8 if spec.signed else torch.uint8

    def q(x, s, z):
        return (torch.round(x.to(torch.float32) / s) + z).clamp(spec.qmin, spec.qmax).to(dtype)

    return _apply(q, x, scale, zero_point, spec)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Float32 values ``s * (q - z)`` of integer codes."""

    def dq(q, s, z):
        return (q.to(torch.float32) - z.to(torch.float32)) * s

    return _apply(dq, q, scale, zero_point, spec)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Quantize-dequantize in float (the simulated effect of quantization); keeps ``x``'s dtype.

    Not differentiable (no straight-through gradient); learned-rounding passes bring their own.
    """

    def fq(x, s, z):
        zf = z.to(torch.float32)
        q = (torch.round(x.to(torch.float32) / s) + zf).clamp(spec.qmin, spec.qmax)
        return ((q - zf) * s).to(x.dtype)

    return _apply(fq, x, scale, zero_point, spec)


def quantize_weight(
    w: torch.Tensor,
    spec: QSpec,
    *,
    clip_search: bool = False,
    p: float = 2.4,
    steps: int = 20,
    refine: int = 10,
    min_ratio: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a weight: ``(codes, scale, zero_point)`` from its per-granularity min/max.

    With ``clip_search=True`` the range of each channel / group is shrunk by the ratio r that minimises
    the Lp norm (``p``, default 2.4) of its exact round-trip error: ``steps`` ratios evenly in
    ``[min_ratio, 1]``, then ``refine`` ratios between the two neighbours of each one's best (a final
    resolution of about (1 − min_ratio) / (steps · (refine + 1))). Costs ``steps + refine`` passes.
    """
    _require_uniform(spec)
    w = w.detach()
    lo, hi = min_max(w, spec)
    if clip_search:
        lo, hi = _clip_search(w, lo, hi, spec, p=p, steps=steps, refine=refine, min_ratio=min_ratio)
    scale, zp = compute_qparams(lo, hi, spec)
    return quantize(w, scale, zp, spec), scale, zp


_ROWS_ELEMS = 1 << 18  # elements per work item of the clip search (cache-sized)


@contextlib.contextmanager
def one_thread():
    """Intra-op threads set to 1 meanwhile (restored after): for optimisations of many small ops, where
    OpenMP fork/join costs more than it saves (measured 5-13x slower with 2 threads on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@contextlib.contextmanager
def chunk_parallel():
    """Yield ``pmap(fn, items) -> list`` running items on a pool of ``torch.get_num_threads()`` threads,
    with torch's intra-op threading set to 1 meanwhile (restored after). For loops of many small ops,
    where per-op OpenMP fork/join costs more than it saves (and stalls on a busy machine)."""
    workers = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(1)
    try:
        if workers > 1:
            with ThreadPoolExecutor(workers) as ex:
                yield lambda fn, items: list(ex.map(fn, items))
        else:
            yield lambda fn, items: [fn(i) for i in items]
    finally:
        if workers > 1:
            torch.set_num_threads(workers)


def _lp_error(flat: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, r: torch.Tensor, spec: QSpec,
              p: float) -> torch.Tensor:
    """Per-row Σ |fake_quant(x) − x|^p with the row range scaled by r (``[R, 1]``)."""
    s, z = compute_qparams(lo * r, hi * r, spec)
    zf = z.to(torch.float32)
    q = torch.round(flat / s).add_(zf).clamp_(spec.qmin, spec.qmax)
    e = q.sub_(zf).mul_(s).sub_(flat).abs_()
    return (e.square_() if p == 2 else e.pow_(p)).sum(1)


def _clip_search(
    w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QSpec, *, p: float, steps: int, refine: int,
    min_ratio: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if steps < 2 or refine < 0 or not 0 < min_ratio < 1 or p <= 0:
        raise SpecError(
            f"clip search needs steps >= 2, refine >= 0, 0 < min_ratio < 1 and p > 0; "
            f"got steps={steps}, refine={refine}, min_ratio={min_ratio}, p={p}"
        )
    wf = w.to(torch.float32)
    if spec.granularity == "tensor":
        flat = wf.reshape(1, -1)
    elif spec.granularity == "channel":
        flat = to_rows(wf, spec)
    else:
        g = _to_groups(wf, spec)
        flat = g.reshape(-1, g.shape[-1])
    flat = flat.contiguous()
    lo_f, hi_f = lo.reshape(-1, 1), hi.reshape(-1, 1)
    flat_spec = spec.replace(granularity="tensor", group_size=None, axis=0)
    coarse = torch.linspace(min_ratio, 1.0, steps)
    step = float(coarse[1] - coarse[0])
    best_r = torch.ones(flat.shape[0], 1)
    rows = max(1, _ROWS_ELEMS // max(1, flat.shape[1]))

    def run(a: int) -> None:
        x, lo_c, hi_c = flat[a : a + rows], lo_f[a : a + rows], hi_f[a : a + rows]
        ones = torch.ones(x.shape[0], 1)
        errs = torch.stack([_lp_error(x, lo_c, hi_c, ones * r, flat_spec, p) for r in coarse.tolist()], 1)
        best, arg = errs.min(1)
        r_best = coarse[arg][:, None]
        for k in range(1, refine + 1):
            r = (r_best + (2 * k / (refine + 1) - 1) * step).clamp(min_ratio, 1.0)
            e = _lp_error(x, lo_c, hi_c, r, flat_spec, p)
            better = (e < best)[:, None]
            best = torch.minimum(e, best)
            r_best = torch.where(better, r, r_best)
        best_r[a : a + rows] = r_best

    with chunk_parallel() as pmap:
        pmap(run, range(0, flat.shape[0], rows))
    best_r = best_r.reshape(lo.shape)
    return lo * best_r, hi * best_r


# --- dynamic (run-time) activation quantization ----------------------------------------------------
def dynamic_qparams(x: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) of ``x`` under a dynamic spec, computed from ``x`` itself with the
    formulas of `compute_qparams`: shape ``[..., 1]`` per token (a row of the last dimension), ``[]`` per tensor."""
    _require_uniform(spec)
    if not spec.dynamic:
        raise SpecError(f"dynamic_qparams needs a dynamic spec, got {spec}; static specs take calibrated qparams")
    xf = x.detach().to(torch.float32)
    if spec.granularity == "token":
        if x.dim() == 0:
            raise SpecError("per-token quantization needs a tensor with a last (feature) dimension, got a scalar")
        lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    else:
        lo, hi = xf.min(), xf.max()
    return _qparams_any(lo, hi, spec)


def _qparams_any(lo: torch.Tensor, hi: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute_qparams` without the finiteness check (traced / compiled code cannot branch on data)."""
    qmin, qmax = spec.qmin, spec.qmax
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    if spec.symmetric:
        scale = (torch.maximum(-lo, hi) / ((qmax - qmin) / 2) if spec.signed else hi / qmax).clamp_min(SCALE_EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(SCALE_EPS)
    return scale, (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)


def quantize_dynamic(x: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, zero_point)`` of ``x`` under a dynamic spec; codes are int8 (signed) or uint8."""
    scale, zp = dynamic_qparams(x, spec)
    q = (torch.round(x.to(torch.float32) / scale) + zp).clamp(spec.qmin, spec.qmax)
    return q.to(torch.int8 if spec.signed else torch.uint8), scale, zp


def fake_quantize_dynamic(x: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Quantize-dequantize ``x`` with scales computed from ``x`` (the simulation of a dynamic spec)."""
    scale, zp = dynamic_qparams(x, spec)
    zf = zp.to(torch.float32)
    q = (torch.round(x.to(torch.float32) / scale) + zf).clamp(spec.qmin, spec.qmax)
    return ((q - zf) * scale).to(x.dtype)
