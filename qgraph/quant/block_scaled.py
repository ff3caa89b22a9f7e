"""Uniform codes with block scales, the K-quant way: ``w = d·c − m`` per group of a row, ``c`` in ``0..2^b − 1``,
``d, m ≥ 0`` stored as ``scale_bits``-bit codes of two fp16 scales per row (``d = D_row·sc``, ``m = M_row·mc``).

At 4 bits, groups of 32 and 6-bit scale codes this is 4 + 12/32 bits per weight plus 32 bits per row (4.43 bits on
SmolLM2's 576-wide rows), where fp32 scales and integer zero points cost 4 + 40/32. A float ``m`` also keeps a grid
whose minimum is not a multiple of its step, which is what a Q4_1 GGUF file's weights lie on.

Arithmetic is fixed so that every backend computes the same values: ``d = float32(D_row) * sc`` and
``m = float32(M_row) * mc`` in fp32, then ``w = d·c − m`` in fp32. The exact BCQ form (`to_bcq`) is
``α_i = d·2^(i−1)``, offset ``d·(2^b − 1)/2 − m``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qgraph.errors import SpecError
from qgraph.quant.bcq_weight import BCQWeight, pack_signs
from qgraph.quant.qspec import QSpec


@dataclass(frozen=True, eq=False)
class BlockScaledWeight:
    """``codes`` uint8 ``[M, K]``; ``scale_codes`` / ``min_codes`` uint8 ``[M, G]``; ``super_scale`` /
    ``super_min`` fp16 ``[M]``; ``spec``: a uniform spec with ``scale_bits`` and a group size."""

    codes: torch.Tensor
    scale_codes: torch.Tensor
    min_codes: torch.Tensor
    super_scale: torch.Tensor
    super_min: torch.Tensor
    spec: QSpec
    planes: torch.Tensor | None = field(default=None, repr=False)  # the stored bit-planes, when read from them

    def __post_init__(self) -> None:
        spec = self.spec
        if spec.scheme != "uniform" or spec.scale_bits is None:
            raise SpecError(f"BlockScaledWeight needs a uniform spec with scale_bits, got {spec}")
        if self.codes.dim() != 2:
            raise SpecError(f"BlockScaledWeight codes must be [M, K], got {tuple(self.codes.shape)}")
        m, k = self.codes.shape
        g = k // spec.group_size
        want = {"codes": ((m, k), torch.uint8), "scale_codes": ((m, g), torch.uint8),
                "min_codes": ((m, g), torch.uint8), "super_scale": ((m,), torch.float16),
                "super_min": ((m,), torch.float16)}
        for name, (shape, dtype) in want.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise SpecError(f"BlockScaledWeight.{name} must be {dtype} {list(shape)}, got {t.dtype} "
                                f"{list(t.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def group_size(self) -> int:
        return self.spec.group_size

    @property
    def nbytes(self) -> int:
        """Stored bytes (`tensors`): packed codes, the two scale codes of a group (12 bits up to 6-bit codes, else
        16), two fp16 per row."""
        m, k = self.shape
        g = self.scale_codes.shape[1]
        scales = m * (g + (g + 1) // 2) if self.spec.scale_bits <= 6 else 2 * m * g
        return m * ((k + 7) // 8) * self.bits + scales + 4 * m

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``d``, ``m`` ``[M, G]`` in fp32, computed the one way every backend uses."""
        return _coded(self.super_scale, self.scale_codes), _coded(self.super_min, self.min_codes)

    def dequantize(self) -> torch.Tensor:
        d, mn = self.scales()
        gs = self.group_size
        return d.repeat_interleave(gs, 1) * self.codes.float() - mn.repeat_interleave(gs, 1)

    def to_bcq(self) -> BCQWeight:
        """The BCQ code that stands for exactly this matrix (up to fp32 rounding of the offset)."""
        d, mn = self.scales()
        b = self.bits
        alpha = torch.stack([d * float(2 ** (i - 1)) for i in range(b)])
        offset = d * ((2 ** b - 1) / 2) - mn
        return BCQWeight(self.packed_planes().contiguous(), alpha.contiguous(), offset.contiguous(), self.shape,
                         self.group_size)

    def with_codes(self, codes: torch.Tensor) -> BlockScaledWeight:
        return BlockScaledWeight(codes.to(torch.uint8).contiguous(), self.scale_codes, self.min_codes,
                                 self.super_scale, self.super_min, self.spec)

    def rows(self, idx: slice) -> BlockScaledWeight:
        return BlockScaledWeight(self.codes[idx].contiguous(), self.scale_codes[idx].contiguous(),
                                 self.min_codes[idx].contiguous(), self.super_scale[idx].contiguous(),
                                 self.super_min[idx].contiguous(), self.spec)

    @staticmethod
    def cat(parts: list[BlockScaledWeight]) -> BlockScaledWeight:
        if any(p.spec != parts[0].spec for p in parts):
            raise SpecError("BlockScaledWeight.cat: parts have different specs")
        return BlockScaledWeight(*(torch.cat([getattr(p, n) for p in parts]) for n in _TENSORS), parts[0].spec)

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Stored tensors: codes as little-endian bit-planes ``[b, M, ceil(K/8)]``; up to 6-bit scale codes as
        ``scale_lo`` ``[M, G]`` = (sc & 15) | (mc & 15) << 4 and ``scale_hi`` ``[M, ceil(G/2)]`` holding
        (sc >> 4) | (mc >> 4) << 2 of group 2j in its low nibble and of group 2j + 1 in its high one; wider
        codes as they are; the row scales."""
        out = {prefix + "codes": self.packed_planes(), prefix + "super_scale": self.super_scale,
               prefix + "super_min": self.super_min}
        sc, mc = self.scale_codes.to(torch.int32), self.min_codes.to(torch.int32)
        if self.spec.scale_bits > 6:
            out.update({prefix + "scale_codes": self.scale_codes, prefix + "min_codes": self.min_codes})
            return out
        hi = (sc >> 4) | ((mc >> 4) << 2)
        if hi.shape[1] % 2:
            hi = torch.cat([hi, hi.new_zeros(hi.shape[0], 1)], 1)
        out[prefix + "scale_lo"] = ((sc & 15) | ((mc & 15) << 4)).to(torch.uint8)
        out[prefix + "scale_hi"] = (hi[:, 0::2] | (hi[:, 1::2] << 4)).to(torch.uint8)
        return out

    def packed_planes(self) -> torch.Tensor:
        """Bit ``i`` of every code as LSB-first bytes ``[b, M, ceil(K/8)]`` (the BCQ planes of `to_bcq`)."""
        if self.planes is not None:
            return self.planes
        return torch.cat([pack_signs(torch.stack([(c >> i) & 1 for i in range(self.bits)]))
                          for c in self.codes.split(_ROWS)], 1)

    @classmethod
    def from_tensors(cls, spec: QSpec, shape: tuple[int, int], tensors: dict[str, torch.Tensor],
                     prefix: str = "") -> BlockScaledWeight:
        from qgraph.quant.bcq_weight import unpack_signs

        m, k = shape
        packed = tensors[prefix + "codes"]
        if packed.dim() != 3 or tuple(packed.shape[:2]) != (spec.bits, m) or packed.shape[2] != (k + 7) // 8:
            raise SpecError(f"{prefix}codes holds bit-planes {tuple(packed.shape)}, expected "
                            f"{(spec.bits, m, (k + 7) // 8)}")
        codes = torch.empty(m, k, dtype=torch.uint8)
        for r0 in range(0, m, _ROWS):  # a few rows at a time: the ±1 planes take 4 bytes per weight
            planes = unpack_signs(packed[:, r0:r0 + _ROWS], k)
            c = codes[r0:r0 + _ROWS]
            c.zero_()
            for i in range(spec.bits):
                c |= (planes[i] > 0).to(torch.uint8) << i
        if spec.scale_bits > 6:
            sc, mc = tensors[prefix + "scale_codes"], tensors[prefix + "min_codes"]
        else:
            g = k // spec.group_size
            lo, hi = tensors[prefix + "scale_lo"].to(torch.int32), tensors[prefix + "scale_hi"].to(torch.int32)
            if tuple(lo.shape) != (m, g) or tuple(hi.shape) != (m, (g + 1) // 2):
                raise SpecError(f"{prefix}scale_lo / scale_hi are {tuple(lo.shape)} / {tuple(hi.shape)}, expected "
                                f"{(m, g)} / {(m, (g + 1) // 2)}")
            h = torch.stack([hi & 15, hi >> 4], 2).reshape(m, -1)[:, :g]
            sc = ((lo & 15) | ((h & 3) << 4)).to(torch.uint8)
            mc = ((lo >> 4) | ((h >> 2) << 4)).to(torch.uint8)
        return cls(codes, sc.contiguous(), mc.contiguous(), tensors[prefix + "super_scale"],
                   tensors[prefix + "super_min"], spec, packed)


_TENSORS = ("codes", "scale_codes", "min_codes", "super_scale", "super_min")
_ROWS = 4096  # rows unpacked / packed at a time


@dataclass(frozen=True)
class BlockGrid:
    """The fixed grid of a block-scaled weight before its codes are chosen: scale codes and row scales, and
    ``d``, ``m`` ``[M, G]`` as fp32 values."""

    scale_codes: torch.Tensor
    min_codes: torch.Tensor
    super_scale: torch.Tensor
    super_min: torch.Tensor
    spec: QSpec

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _coded(self.super_scale, self.scale_codes), _coded(self.super_min, self.min_codes)

    def round(self, w: torch.Tensor, cols: slice | None = None) -> torch.Tensor:
        """Nearest codes ``[M, K]`` of ``w`` (or of its columns ``cols``, a whole number of groups)."""
        d, mn = self.scales()
        gs = self.spec.group_size
        if cols is not None:
            g0, g1 = cols.start // gs, cols.stop // gs
            d, mn = d[:, g0:g1], mn[:, g0:g1]
        return _round(w.float(), d, mn, gs, self.spec.qmax)

    def weight(self, codes: torch.Tensor) -> BlockScaledWeight:
        return BlockScaledWeight(codes.to(torch.uint8).contiguous(), self.scale_codes, self.min_codes,
                                 self.super_scale, self.super_min, self.spec)


def _coded(row_scale: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``float32(row_scale) · code`` ``[M, G]``: a group's d or m from its code."""
    return row_scale.float()[:, None] * codes.float()


def _round(w: torch.Tensor, d: torch.Tensor, mn: torch.Tensor, gs: int, qmax: int) -> torch.Tensor:
    dd = d.repeat_interleave(gs, 1)
    safe = torch.where(dd > 0, dd, torch.ones_like(dd))
    c = ((w + mn.repeat_interleave(gs, 1)) / safe).round_().clamp_(0, qmax)
    return torch.where(dd > 0, c, torch.zeros_like(c)).to(torch.uint8)


def _group_error(w: torch.Tensor, d: torch.Tensor, mn: torch.Tensor, gs: int, qmax: int,
                 importance: torch.Tensor | None) -> torch.Tensor:
    """Weighted squared error per row-group ``[M, G]`` of rounding ``w`` to the grid ``(d, m)``."""
    c = _round(w, d, mn, gs, qmax).float()
    err = (d.repeat_interleave(gs, 1) * c - mn.repeat_interleave(gs, 1) - w) ** 2
    if importance is not None:
        err = err * importance
    return err.reshape(w.shape[0], -1, gs).sum(-1)


def fit_grid(w: torch.Tensor, spec: QSpec, importance: torch.Tensor | None = None) -> BlockGrid:
    """The block grid of ``w [M, K]``: each group's min/max range (the min clamped at 0, as K-quants do), its
    ``d`` and ``m`` coded against per-row fp16 scales, then each group's codes moved by ±1 where that lowers its
    (``importance``-weighted, broadcast over rows) rounding error."""
    if spec.scale_bits is None or spec.granularity != "group":
        raise SpecError(f"fit_grid needs a per-group spec with scale_bits, got {spec}")
    if w.dim() != 2:
        raise SpecError(f"fit_grid quantizes a matrix [out, in], got shape {tuple(w.shape)}")
    spec.check_tensor(w.shape)
    w = w.detach().float().cpu()
    m_rows, k = w.shape
    gs, qmax, smax = spec.group_size, spec.qmax, (1 << spec.scale_bits) - 1
    g = w.reshape(m_rows, k // gs, gs)
    lo = g.amin(-1).clamp(max=0.0)
    d = (g.amax(-1) - lo) / qmax
    mn = -lo
    sup_d = (d.amax(-1) / smax).to(torch.float16)
    sup_m = (mn.amax(-1) / smax).to(torch.float16)

    def codes_of(v: torch.Tensor, sup: torch.Tensor) -> torch.Tensor:
        s = sup.float()[:, None]
        return torch.where(s > 0, (v / torch.where(s > 0, s, torch.ones_like(s))).round(), torch.zeros_like(v)
                           ).clamp(0, smax)

    sc, mc = codes_of(d, sup_d), codes_of(mn, sup_m)
    imp = None if importance is None else importance.detach().float().cpu().reshape(1, k).expand(m_rows, k)
    best = _group_error(w, _coded(sup_d, sc), _coded(sup_m, mc), gs, qmax, imp)
    for ds in (-1, 0, 1):
        for ms in (-1, 0, 1):
            if ds == 0 and ms == 0:
                continue
            sc2, mc2 = (sc + ds).clamp(0, smax), (mc + ms).clamp(0, smax)
            e = _group_error(w, _coded(sup_d, sc2), _coded(sup_m, mc2), gs, qmax, imp)
            take = e < best
            best = torch.where(take, e, best)
            sc, mc = torch.where(take, sc2, sc), torch.where(take, mc2, mc)
    return BlockGrid(sc.to(torch.uint8), mc.to(torch.uint8), sup_d, sup_m, spec)


def quantize(w: torch.Tensor, spec: QSpec, importance: torch.Tensor | None = None) -> BlockScaledWeight:
    """Round-to-nearest on the fitted grid (`fit_grid`)."""
    grid = fit_grid(w, spec, importance)
    return grid.weight(grid.round(w.detach().float().cpu()))
