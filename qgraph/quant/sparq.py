"""SPARQ activation quantization, simulated in float (Shomron et al., "Post-Training Sparsity-Aware
Quantization", 2021).

Activations are quantized to b-bit integer codes (b = 8 usually) with their calibrated qparams; then each
integer value ``v = q − z`` is cut to an n-bit *window* of its magnitude (sign-magnitude; for the paper's
unsigned post-ReLU codes with ``z = 0`` this is the code itself):

- **bSPARQ**: with ``m = ⌊log2 |v|⌋`` the position of the leading one, the window keeps bits
  ``[shift, shift + n − 1]`` where ``shift = max(0, m − n + 1)`` (optionally the next allowed placement,
  ``shifts``). Truncation keeps ``⌊|v| / 2^shift⌋ · 2^shift`` (error < ``2^shift``); rounding takes the
  nearest multiple of ``2^shift`` (error ≤ ``2^(shift−1)``), falling back to truncation where the rounded
  value would leave the quantization range. Values with ``|v| < 2^n`` pass unchanged.
- **vSPARQ**: values are paired along a dimension (adjacent elements of the dot product: the input
  channels of a conv, the last dim of a Linear input); when one of a pair is zero the other gets a
  ``2n``-bit window (exact when ``2n ≥ b``), otherwise both get the n-bit bSPARQ window. An odd last
  element is unpaired and gets n bits.

Everything is vectorised torch on integer-valued float tensors; `sparq_fake_quantize` is the drop-in
replacement of ``torch.fake_quantize_per_tensor_affine`` that the ``sparq`` pass puts into graphs.
"""
from __future__ import annotations

from typing import Literal

import torch

from qgraph.errors import SpecError

Mode = Literal["bsparq", "vsparq"]
MODES: tuple[str, ...] = ("bsparq", "vsparq")


def _check(bits: int, mode: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise SpecError(f"sparq: the window width bits must be an int >= 1, got {bits!r}")
    if mode not in MODES:
        raise SpecError(f"sparq: mode must be one of {MODES}, got {mode!r}")


def leading_one(mag: torch.Tensor) -> torch.Tensor:
    """Position of the leading one of non-negative integer values (float tensor); -1 for 0."""
    _, e = torch.frexp(mag)
    return e.to(torch.int32) - 1


def window(v: torch.Tensor, bits: int, *, rounding: bool = False, lo: float | None = None,
           hi: float | None = None, shifts: tuple[int, ...] = ()) -> torch.Tensor:
    """bSPARQ: each integer value of ``v`` (float tensor) cut to a ``bits``-wide window of its magnitude
    starting at its leading one. ``[lo, hi]``: the integer range a rounded value must stay in (rounding
    falls back to truncation outside it). ``shifts``: allowed window placements (least significant bit
    of the window); empty means every placement."""
    _check(bits, "bsparq")
    v = v.to(torch.float32) if not v.is_floating_point() else v
    mag = v.abs()
    shift = (leading_one(mag) - bits + 1).clamp_min(0)
    if shifts:
        allowed = torch.tensor(sorted({int(s) for s in shifts}), dtype=torch.int32, device=v.device)
        if int(allowed[0]) < 0:
            raise SpecError(f"sparq: window placements must be >= 0, got {tuple(shifts)}")
        need = int(shift.max()) if shift.numel() else 0
        if int(allowed[-1]) < need:
            raise SpecError(f"sparq: the highest allowed window placement {int(allowed[-1])} cannot reach the "
                            f"leading one of these values (needs {need}); add placement {need} to shifts")
        shift = allowed[torch.searchsorted(allowed, shift.contiguous())]
    unit = torch.ldexp(torch.ones_like(mag), shift)
    kept = torch.floor(mag / unit) * unit
    if rounding:
        up = torch.floor(mag / unit + 0.5) * unit
        bound = torch.full_like(mag, float("inf"))
        if hi is not None:
            bound = torch.where(v >= 0, torch.as_tensor(float(hi), dtype=mag.dtype), bound)
        if lo is not None:
            bound = torch.where(v < 0, torch.as_tensor(-float(lo), dtype=mag.dtype), bound)
        kept = torch.where(up <= bound, up, kept)
    return torch.copysign(kept, v)


def vsparq(v: torch.Tensor, bits: int, *, dim: int = -1, rounding: bool = False, lo: float | None = None,
           hi: float | None = None, shifts: tuple[int, ...] = ()) -> torch.Tensor:
    """vSPARQ: pairs of adjacent values along ``dim``; a value whose partner is zero gets ``2·bits``,
    the others the ``bits``-wide bSPARQ window."""
    _check(bits, "vsparq")
    if v.dim() == 0:
        return window(v, bits, rounding=rounding, lo=lo, hi=hi, shifts=shifts)
    n = v.shape[dim]
    idx = torch.arange(n, device=v.device) ^ 1
    paired = idx < n
    idx = idx.clamp_max(n - 1)
    partner = v.index_select(dim, idx)
    shape = [1] * v.dim()
    shape[dim] = n
    partner_zero = (partner == 0) & paired.reshape(shape)
    narrow = window(v, bits, rounding=rounding, lo=lo, hi=hi, shifts=shifts)
    wide = window(v, 2 * bits, rounding=rounding, lo=lo, hi=hi)
    return torch.where(partner_zero, wide, narrow)


def sparq_values(v: torch.Tensor, bits: int, mode: Mode = "bsparq", *, dim: int = -1, rounding: bool = False,
                 lo: float | None = None, hi: float | None = None, shifts: tuple[int, ...] = ()) -> torch.Tensor:
    """`window` (bSPARQ) or `vsparq` of integer values ``v``."""
    _check(bits, mode)
    if mode == "vsparq":
        return vsparq(v, bits, dim=dim, rounding=rounding, lo=lo, hi=hi, shifts=shifts)
    return window(v, bits, rounding=rounding, lo=lo, hi=hi, shifts=shifts)


def sparq_fake_quantize(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int, bits: int = 4,
                        mode: str = "bsparq", rounding: bool = True, dim: int = -1,
                        shifts: tuple[int, ...] = ()) -> torch.Tensor:
    """Per-tensor fake quantization (as ``torch.fake_quantize_per_tensor_affine``) followed by the SPARQ
    window on the integer values ``q − z``; the result stays on the b-bit grid (so an int8 kernel that
    re-quantizes it with the same qparams gets exactly the SPARQ codes). Values that fit in ``bits`` bits
    come out bit-identical to the plain fake quantization."""
    fq = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    v = torch.round(fq.to(torch.float32) / scale)
    out = sparq_values(v, bits, mode, dim=dim, rounding=rounding, lo=qmin - zero_point, hi=qmax - zero_point,
                       shifts=tuple(shifts))
    return torch.where(out == v, fq.to(torch.float32), out * scale).to(x.dtype)
