"""Multipoint quantization (Liu et al., "Post-training Quantization with Multiple Points: Mixed
Precision without Mixed Precision", 2021): an output channel's weight row is a sum of low-bit vectors,

    w_c ≈ Σ_{k=1..n_c} s_{c,k} · Q_{c,k},

all at the same bit width. Point 1 is the ordinary uniform quantization of the weight (any `QSpec`
granularity: a `UniformWeight`); each further point is fitted greedily to the residual
``r = w − Σ_{j<k} s_j Q_j`` of its row: symmetric signed codes ``Q = clamp(round(r / s), qmin, qmax)``
with the per-row scale s that minimises ‖r − s·Q‖² (a search over clipping ratios, as the Lp clip search
with p = 2). Every element's error can only shrink when a point is added (round to nearest on a grid
that contains 0: ``|r − s·Q| ≤ |r|`` whether or not the value clips), so the error is non-increasing in
the number of points and never above the single-point (round-to-nearest) error.

Which rows get extra points is the caller's choice (``counts``); the pass gives them to the output
channels with the largest output error on calibration data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qgraph.errors import SpecError
from qgraph.quant import uniform
from qgraph.quant.qspec import QSpec
from qgraph.quant.qtensor import UniformWeight

_FORMAT = "qgraph.multipoint/1"


def _rows(t: torch.Tensor, axis: int) -> torch.Tensor:
    return t.movedim(axis, 0).reshape(t.shape[axis], -1)


def _unrows(rows: torch.Tensor, shape: tuple[int, ...], axis: int) -> torch.Tensor:
    moved = list(shape)
    moved.insert(0, moved.pop(axis))
    return rows.reshape(moved).movedim(0, axis)


def point_spec(bits: int) -> QSpec:
    """The spec of the extra points: signed, symmetric, one scale per row."""
    return QSpec.uniform(bits, granularity="channel", axis=0)


def fit_point(r: torch.Tensor, bits: int, *, steps: int = 20, refine: int = 10,
              min_ratio: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """One point for each row of ``r [C, K]``: int8 codes ``[C, K]`` and float32 scales ``[C]`` minimising
    the row's squared error over ``steps + refine`` clipping ratios of its max |r|."""
    spec = point_spec(bits)
    r = r.detach().to(torch.float32)
    lo, hi = r.amin(dim=1), r.amax(dim=1)
    lo, hi = uniform._clip_search(r, lo, hi, spec, p=2.0, steps=steps, refine=refine, min_ratio=min_ratio)
    scale, zp = uniform.compute_qparams(lo, hi, spec)
    return uniform.quantize(r, scale, zp, spec), scale


def residual_points(w: torch.Tensor, base: UniformWeight, axis: int, extra: int
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``extra`` further points fitted greedily to the residual of *every* row (``[(codes [C, K], scale
    [C]), ...]``); a `MultipointWeight` keeps the ones its ``counts`` ask for."""
    bits = base.spec.bits
    r = _rows(w.detach().to(torch.float32) - base.dequantize().reshape(w.shape), axis).clone()
    out = []
    for _ in range(extra):
        codes, scale = fit_point(r, bits)
        r -= scale[:, None] * codes.to(torch.float32)
        out.append((codes, scale))
    return out


@dataclass(frozen=True, eq=False)
class MultipointWeight:
    """A weight as a base `UniformWeight` plus extra low-bit points on some output channels.

    ``axis``: the output-channel axis of the weight; ``counts``: uint8 ``[C]``, extra points per channel;
    ``codes[k]``: int8 ``[n_k, K]`` (K = the other dims flattened in order) and ``scales[k]``: float32
    ``[n_k]`` for the ``n_k`` channels with ``counts > k``, in channel order. Extra points are signed
    symmetric codes of the base spec's bit width.
    """

    base: UniformWeight
    counts: torch.Tensor
    codes: tuple[torch.Tensor, ...]
    scales: tuple[torch.Tensor, ...]
    axis: int

    def __post_init__(self) -> None:
        shape = self.base.shape
        if not -len(shape) <= self.axis < len(shape):
            raise SpecError(f"MultipointWeight: axis {self.axis} is out of range for a weight of shape {shape}")
        c = shape[self.axis]
        k = (self.base.codes.numel() // c) if c else 0
        if tuple(self.counts.shape) != (c,) or self.counts.dtype != torch.uint8:
            raise SpecError(f"MultipointWeight.counts must be uint8 of shape ({c},), got {self.counts.dtype} "
                            f"{tuple(self.counts.shape)}")
        most = int(self.counts.max()) if c else 0
        if len(self.codes) != len(self.scales) or most > len(self.codes):
            raise SpecError(f"MultipointWeight: {len(self.codes)} code planes, {len(self.scales)} scale vectors and "
                            f"counts up to {most} do not agree")
        for j, (q, s) in enumerate(zip(self.codes, self.scales)):
            n = int((self.counts > j).sum())
            if tuple(q.shape) != (n, k) or q.dtype != torch.int8 or tuple(s.shape) != (n,) or s.dtype != torch.float32:
                raise SpecError(f"MultipointWeight point {j + 2}: expected int8 codes ({n}, {k}) and float32 scales "
                                f"({n},), got {q.dtype} {tuple(q.shape)} and {s.dtype} {tuple(s.shape)}")

    @property
    def spec(self) -> QSpec:
        return self.base.spec

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def bits(self) -> int:
        return self.base.spec.bits

    @property
    def max_points(self) -> int:
        return 1 + len(self.codes)

    def points(self) -> torch.Tensor:
        """Points per output channel (1 + extra), int64 ``[C]``."""
        return self.counts.to(torch.int64) + 1

    @property
    def nbytes(self) -> int:
        """Base bytes + packed extra codes + fp32 scales + one byte of point count per channel."""
        extra = sum((q.numel() * self.bits + 7) // 8 + s.numel() * 4 for q, s in zip(self.codes, self.scales))
        return int(self.base.nbytes) + extra + self.counts.numel()

    def dequantize(self) -> torch.Tensor:
        rows = _rows(self.base.dequantize(), self.axis).clone()
        for j, (q, s) in enumerate(zip(self.codes, self.scales)):
            idx = torch.nonzero(self.counts > j).flatten()
            rows.index_add_(0, idx, s[:, None] * q.to(torch.float32))
        return _unrows(rows, self.shape, self.axis)

    @classmethod
    def build(cls, base: UniformWeight, points: list[tuple[torch.Tensor, torch.Tensor]], counts: torch.Tensor,
              axis: int) -> MultipointWeight:
        """Keep, of the all-row ``points`` (from `residual_points`), the first ``counts[c]`` for each channel."""
        counts = counts.to(torch.uint8)
        levels = int(counts.max()) if counts.numel() else 0
        codes, scales = [], []
        for j in range(levels):
            keep = counts > j
            q, s = points[j]
            codes.append(q[keep].contiguous())
            scales.append(s[keep].to(torch.float32).contiguous())
        return cls(base, counts.contiguous(), tuple(codes), tuple(scales), axis)

    # --- serialization (artifacts): tensors + a JSON-able manifest --------------------------------
    def manifest(self) -> dict:
        return {"format": _FORMAT, "spec": self.base.spec.to_dict(), "axis": self.axis, "levels": len(self.codes)}

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {f"{prefix}codes": self.base.codes, f"{prefix}scale": self.base.scale,
               f"{prefix}zero_point": self.base.zero_point, f"{prefix}counts": self.counts}
        for j, (q, s) in enumerate(zip(self.codes, self.scales)):
            out[f"{prefix}point{j + 2}.codes"] = q
            out[f"{prefix}point{j + 2}.scale"] = s
        return out

    @classmethod
    def from_parts(cls, manifest: dict, tensors: dict[str, torch.Tensor], prefix: str = "") -> MultipointWeight:
        if manifest.get("format") != _FORMAT:
            raise SpecError(f"not a qgraph multipoint weight manifest (format={manifest.get('format')!r})")
        try:
            base = UniformWeight(tensors[f"{prefix}codes"], tensors[f"{prefix}scale"], tensors[f"{prefix}zero_point"],
                                 QSpec.from_dict(manifest["spec"]))
            levels = int(manifest["levels"])
            codes = tuple(tensors[f"{prefix}point{j + 2}.codes"] for j in range(levels))
            scales = tuple(tensors[f"{prefix}point{j + 2}.scale"] for j in range(levels))
            return cls(base, tensors[f"{prefix}counts"], codes, scales, int(manifest["axis"]))
        except KeyError as e:
            raise SpecError(f"multipoint weight is missing tensor or field {e}; the file is incomplete") from None

    def __repr__(self) -> str:
        pts = self.points().float()
        return (f"MultipointWeight({self.shape}, {self.spec}, points mean {float(pts.mean()):.2f} max "
                f"{self.max_points}, {self.nbytes} bytes)")


def greedy_counts(errors: torch.Tensor, budget: int) -> torch.Tensor:
    """Extra points per channel: ``errors [P, C]`` is channel c's error with ``p + 1`` points; ``budget``
    extra points go one at a time to the channel with the largest current error, as long as its next
    point lowers that error. Returns int64 ``[C]`` counts (≤ P − 1 each, sum ≤ budget)."""
    import heapq

    p, c = errors.shape
    counts = torch.zeros(c, dtype=torch.int64)
    e = errors.to(torch.float64).tolist()
    heap = [(-e[0][j], j) for j in range(c) if p > 1 and e[1][j] < e[0][j]]
    heapq.heapify(heap)
    left = int(budget)
    while left > 0 and heap:
        _, j = heapq.heappop(heap)
        k = int(counts[j]) + 1
        counts[j] = k
        left -= 1
        if k + 1 < p and e[k + 1][j] < e[k][j]:
            heapq.heappush(heap, (-e[k][j], j))
    return counts
