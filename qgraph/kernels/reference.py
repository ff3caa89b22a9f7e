"""Pure-torch BiQGEMM: the semantics every kernel is tested against, and a LUT baseline.

- `biqgemm_reference`: ``y = x @ Ŵᵀ + bias`` with ``Ŵ = w.dequantize()``, computed in fp32 on w's device,
  returned in x's dtype. x is ``[..., K]`` (any leading dims, fp32 / bf16 / fp16).
- `biqgemm_lut_torch`: the BiQGEMM algorithm written with torch ops (μ=4 tables by the doubling trick,
  one gather per key, α scaling, z·Σx) — the "pure-torch LUT reference" the benchmark compares against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qgraph.errors import KernelError
from qgraph.quant.bcq_weight import BCQWeight

MU = 4
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GATHER_ELEMS = 1 << 24  # gathered table entries materialized at once by the LUT baseline


def _check(x: torch.Tensor, w: BCQWeight, bias: torch.Tensor | None) -> None:
    if not isinstance(w, BCQWeight):
        raise KernelError(f"w must be a BCQWeight, got {type(w).__name__}")
    m, k = w.shape
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        raise KernelError(f"x must be a float32/bfloat16/float16 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise KernelError(f"x must have shape [..., {k}] for a {m}x{k} weight, got {tuple(x.shape)}")
    if x.device != w.alpha.device:
        raise KernelError(f"x is on {x.device} but the weight is on {w.alpha.device}; move one of them")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != m or bias.device != x.device):
        raise KernelError(f"bias must be [{m}] on {x.device}, got {tuple(bias.shape)} on {bias.device}")


def biqgemm_reference(x: torch.Tensor, w: BCQWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.dequantize()ᵀ (+ bias)`` in fp32, cast back to x's dtype."""
    _check(x, w, bias)
    y = x.to(torch.float32) @ w.dequantize().t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


@dataclass(frozen=True, eq=False)
class LutTorchWeight:
    """A `BCQWeight` prepared for `biqgemm_lut_torch`: flat table indices per plane, row and chunk."""

    index: torch.Tensor  # int32 [q, M, G·C]: (g·C + c)·16 + key
    weight: BCQWeight
    chunks: int  # C = ceil(group_size / 4) chunks per group

    @classmethod
    def prepare(cls, w: BCQWeight) -> LutTorchWeight:
        m, k = w.shape
        gs, g = w.group_size, w.num_groups
        c = -(-gs // MU)
        base = torch.arange(g * c, dtype=torch.int32, device=w.planes.device) * (1 << MU)
        if gs % MU == 0:  # chunks start on nibble boundaries: the keys are the planes' nibbles
            nib = torch.stack([w.planes & 15, w.planes >> 4], dim=-1).reshape(w.bits, m, -1)[..., : g * c]
            nib = torch.nn.functional.pad(nib, (0, g * c - nib.shape[-1]))  # partial last group
            return cls(index=(nib.to(torch.int32) + base).contiguous(), weight=w, chunks=c)
        bits = (w.signs() > 0).to(torch.int32)  # [q, M, K]
        padded = torch.zeros(w.bits, m, g * c * MU, dtype=torch.int32, device=bits.device)
        cols = torch.arange(k, device=bits.device)
        padded[:, :, (cols // gs) * c * MU + cols % gs] = bits
        shifts = torch.arange(MU, dtype=torch.int32, device=bits.device)
        keys = (padded.reshape(w.bits, m, g * c, MU) << shifts).sum(-1, dtype=torch.int32)
        return cls(index=(keys + base).contiguous(), weight=w, chunks=c)


def lut_tables(x: torch.Tensor, group_size: int, chunks: int) -> torch.Tensor:
    """μ=4 tables ``T[n, g·C + c, key] = Σ_s (bit_s(key) ? +x : −x)`` built by the doubling trick."""
    n, k = x.shape
    g = -(-k // group_size)
    xp = torch.zeros(n, g * chunks * MU, dtype=x.dtype, device=x.device)
    cols = torch.arange(k, device=x.device)
    xp[:, (cols // group_size) * chunks * MU + cols % group_size] = x
    xc = xp.reshape(n, g * chunks, MU)
    t = -xc.sum(-1, keepdim=True)
    for s in range(MU):
        t = torch.cat([t, t + 2 * xc[..., s : s + 1]], dim=-1)
    return t  # [n, g·C, 16]


def biqgemm_lut_torch(
    x: torch.Tensor, w: BCQWeight | LutTorchWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The LUT algorithm in torch ops (fp32); equals `biqgemm_reference` to fp32 rounding."""
    lw = w if isinstance(w, LutTorchWeight) else LutTorchWeight.prepare(w)
    bw = lw.weight
    _check(x, bw, bias)
    m, k = bw.shape
    q, g, gs = bw.bits, bw.num_groups, bw.group_size
    x2 = x.reshape(-1, k).to(torch.float32)
    n = x2.shape[0]
    tables = lut_tables(x2, gs, lw.chunks).reshape(n, -1)  # [n, G·C·16]
    y = torch.empty(n, m, dtype=torch.float32, device=x.device)
    flat = lw.index.reshape(-1)
    rows_per_step = max(1, _GATHER_ELEMS // max(1, flat.numel()))
    for r0 in range(0, n, rows_per_step):
        t = tables[r0 : r0 + rows_per_step]
        partial = t.index_select(1, flat).reshape(t.shape[0], q, m, g, lw.chunks).sum(-1)  # [n', q, M, G]
        y[r0 : r0 + rows_per_step] = (partial * bw.alpha).sum(dim=(1, 3))
    if bw.offset is not None:
        sums = torch.zeros(n, g, dtype=torch.float32, device=x.device)
        sums.index_add_(1, torch.arange(k, device=x.device) // gs, x2)
        y = y + sums @ bw.offset.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*x.shape[:-1], m).to(x.dtype)
