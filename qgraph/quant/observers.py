"""Streaming range observers for calibration: ``observe(batch)`` any number of times, then ``range(spec)``
or ``qparams(spec)``. Memory is bounded (a few scalars, a per-channel vector, or a fixed histogram).

Exactness of streaming (feeding batches one by one vs. the concatenation at once):
- ``minmax``: exact, per tensor and per channel.
- ``moving_average``: NOT batch-split invariant by design (an exponential average of per-batch extremes).
- ``percentile``, ``mse``, ``entropy``: built on `SymmetricHistogram`, a histogram over ``[-a, a]`` whose
  half-width a doubles (merging bin pairs, which keeps counts exact) whenever data falls outside. When the
  grid is the same (``amax`` given up front, or the batch holding the largest |x| comes first) streaming
  equals one-shot exactly; otherwise the grids differ by a power of two and results agree within about
  one bin width of the coarser grid. Results are accurate to about a bin width (2a / bins).
"""
from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch

from qgraph.errors import CalibrationError, SpecError
from qgraph.quant.qspec import OBSERVER_NAMES, QSpec
from qgraph.quant.uniform import compute_qparams

Range = tuple[torch.Tensor, torch.Tensor]


def _prep(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x).detach()
    if not x.is_floating_point():
        x = x.to(torch.float32)
    if x.numel() and not torch.isfinite(x).all():
        raise CalibrationError("an observer got inf/nan values; check the model and calibration data")
    return x


class Observer:
    """Base class: tracks a range from a stream of tensors."""

    name: ClassVar[str] = ""
    per_channel_ok: ClassVar[bool] = False

    def __init__(self, axis: int | None = None) -> None:
        if axis is not None and not self.per_channel_ok:
            raise SpecError(f"observer {self.name!r} is per-tensor only; per-channel needs 'minmax' or 'moving_average'")
        self.axis = axis
        self.num_batches = 0

    def observe(self, x: torch.Tensor) -> None:
        """Fold one batch into the state."""
        x = _prep(x)
        if x.numel() == 0:
            return
        self._observe(x)
        self.num_batches += 1

    def _observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self, spec: QSpec | None = None) -> Range:
        """``(min, max)`` as float32 tensors (0-d per tensor, ``[C]`` per channel). Search-based observers
        pick the range for ``spec`` (default: int8 symmetric per tensor)."""
        if self.num_batches == 0:
            raise CalibrationError(f"observer {self.name!r} has seen no data; run calibration batches first")
        return self._range(spec or QSpec())

    def _range(self, spec: QSpec) -> Range:
        raise NotImplementedError

    def qparams(self, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point for ``spec`` from the observed range."""
        if spec.scheme != "uniform":
            raise SpecError(f"observers calibrate uniform specs; got {spec}")
        if spec.granularity == "group":
            raise SpecError("group granularity is for weights: use qgraph.quant.uniform.quantize_weight")
        if (spec.granularity == "channel") != (self.axis is not None):
            raise SpecError(
                f"spec {spec} is per-{spec.granularity} but this {self.name!r} observer is "
                f"{'per-tensor' if self.axis is None else f'per-channel (axis={self.axis})'}; "
                "build it with observer_for(spec)"
            )
        return compute_qparams(*self.range(spec), spec)

    def reset(self) -> None:
        self.__init__(**self._init_args())  # type: ignore[misc]

    def _init_args(self) -> dict:
        return {"axis": self.axis}

    def _reduce(self, x: torch.Tensor) -> Range:
        x = x.to(torch.float32)
        if self.axis is None:
            return x.min(), x.max()
        if not -x.dim() <= self.axis < x.dim():
            raise CalibrationError(f"observer axis {self.axis} is out of range for a tensor of shape {tuple(x.shape)}")
        rows = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
        return rows.amin(1), rows.amax(1)


class MinMaxObserver(Observer):
    """Running minimum and maximum (per tensor, or per channel along ``axis``)."""

    name = "minmax"
    per_channel_ok = True

    def __init__(self, axis: int | None = None) -> None:
        super().__init__(axis)
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = self._reduce(x)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
            return
        if lo.shape != self.min_val.shape:
            raise CalibrationError(f"channel count changed between batches: {tuple(self.min_val.shape)} -> {tuple(lo.shape)}")
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    def _range(self, spec: QSpec) -> Range:
        return self.min_val.clone(), self.max_val.clone()


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min / max: ``v = momentum * v + (1 - momentum) * batch``
    (the first batch initializes). Smooths outlier batches; depends on how the data is batched."""

    name = "moving_average"

    def __init__(self, momentum: float = 0.9, axis: int | None = None) -> None:
        if not 0.0 <= momentum < 1.0:
            raise SpecError(f"moving_average momentum must be in [0, 1), got {momentum}")
        super().__init__(axis)
        self.momentum = momentum

    def _init_args(self) -> dict:
        return {"momentum": self.momentum, "axis": self.axis}

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = self._reduce(x)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
            return
        if lo.shape != self.min_val.shape:
            raise CalibrationError(f"channel count changed between batches: {tuple(self.min_val.shape)} -> {tuple(lo.shape)}")
        m = self.momentum
        self.min_val = m * self.min_val + (1 - m) * lo
        self.max_val = m * self.max_val + (1 - m) * hi


class SymmetricHistogram:
    """Counts over ``bins`` equal bins on ``[-a, a]`` (bins divisible by 4), float64 counts.

    ``a`` starts at the first batch's max |x| (or ``amax``) and doubles while data falls outside; a
    doubling merges adjacent bin pairs into the middle half, so counts stay exact. 0 is a bin edge, so
    folding to a histogram of |x| is exact too.
    """

    def __init__(self, bins: int = 4096, amax: float | None = None) -> None:
        if bins < 8 or bins % 4:
            raise SpecError(f"histogram bins must be a multiple of 4 and >= 8, got {bins}")
        if amax is not None and not (math.isfinite(amax) and amax > 0):
            raise SpecError(f"histogram amax must be a finite float > 0, got {amax}")
        self.bins = bins
        self.a: float | None = amax
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.min_seen = math.inf
        self.max_seen = -math.inf
        self.zeros = 0.0

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    @property
    def bin_width(self) -> float:
        return 2 * self.a / self.bins

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1).to(torch.float64)
        lo, hi = float(x.min()), float(x.max())
        self.min_seen, self.max_seen = min(self.min_seen, lo), max(self.max_seen, hi)
        self.zeros += float((x == 0).sum())
        xa = max(-lo, hi)
        if self.a is None:
            self.a = xa if xa > 0 else 2.0**-100
        while xa > self.a:
            merged = self.counts.reshape(-1, 2).sum(1)
            self.counts = torch.zeros_like(self.counts)
            self.counts[self.bins // 4 : 3 * self.bins // 4] = merged
            self.a *= 2
        idx = ((x + self.a) * (self.bins / (2 * self.a))).floor().clamp_(0, self.bins - 1).long()
        self.counts += torch.bincount(idx, minlength=self.bins).to(device="cpu", dtype=torch.float64)

    def edges(self) -> np.ndarray:
        return np.linspace(-self.a, self.a, self.bins + 1)

    def folded(self) -> tuple[np.ndarray, float]:
        """Histogram of |x|: counts over ``bins / 2`` bins on ``[0, a]`` and its bin width."""
        c = self.counts.numpy()
        h = self.bins // 2
        return c[h:] + c[:h][::-1], self.bin_width


def _quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """Value below which a fraction q of the histogram mass lies (linear inside a bin)."""
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    target = q * cum[-1]
    i = int(np.searchsorted(cum, target, side="left"))
    if i == 0:
        nz = np.flatnonzero(counts)
        return float(edges[nz[0]]) if len(nz) else float(edges[0])
    i = min(i, len(counts))
    c = counts[i - 1]
    frac = (target - cum[i - 1]) / c if c > 0 else 1.0
    return float(edges[i - 1] + frac * (edges[i] - edges[i - 1]))


class _HistogramObserver(Observer):
    def __init__(self, bins: int = 4096, amax: float | None = None) -> None:
        super().__init__(None)
        self.hist = SymmetricHistogram(bins, amax)
        self._bins, self._amax = bins, amax

    def _init_args(self) -> dict:
        return {"bins": self._bins, "amax": self._amax}

    def _observe(self, x: torch.Tensor) -> None:
        self.hist.add(x)

    def _clip(self, lo: float, hi: float) -> Range:
        h = self.hist
        lo, hi = max(lo, h.min_seen), min(hi, h.max_seen)
        return torch.tensor(min(lo, hi), dtype=torch.float32), torch.tensor(max(lo, hi), dtype=torch.float32)

    def _symmetric(self, t: float) -> Range:
        return self._clip(-t, t)


class PercentileObserver(_HistogramObserver):
    """Clip at a percentile (default 99.99) of |x| for symmetric specs, or at the (100 − p)-th and p-th
    percentiles of x for affine ones; from the histogram, so accurate to about a bin width."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = 4096, amax: float | None = None) -> None:
        if not 0.0 < percentile <= 100.0:
            raise SpecError(f"percentile must be in (0, 100], got {percentile}")
        super().__init__(bins, amax)
        self.percentile = percentile

    def _init_args(self) -> dict:
        return {"percentile": self.percentile, **super()._init_args()}

    def _range(self, spec: QSpec) -> Range:
        p = self.percentile / 100.0
        h = self.hist
        if spec.symmetric:
            folded, w = h.folded()
            t = _quantile(folded, np.arange(len(folded) + 1) * w, p)
            return self._symmetric(t)
        c, e = h.counts.numpy(), h.edges()
        return self._clip(_quantile(c, e, 1.0 - p), _quantile(c, e, p))


class MSEObserver(_HistogramObserver):
    """Lp clip search (default p = 2.4): among ``steps`` shrinks r = k/steps of the observed range (|x|
    max for symmetric specs, [min, max] for affine), pick the one whose expected |error|^p is least.
    Expected error per histogram bin: (s/2)^p / (p + 1) (uniform rounding noise) inside the clip range,
    |c − clip(c)|^p at the bin centre c outside it."""

    name = "mse"

    def __init__(self, p: float = 2.4, steps: int = 100, bins: int = 4096, amax: float | None = None) -> None:
        if p <= 0 or steps < 1:
            raise SpecError(f"mse observer needs p > 0 and steps >= 1, got p={p}, steps={steps}")
        super().__init__(bins, amax)
        self.p, self.steps = p, steps

    def _init_args(self) -> dict:
        return {"p": self.p, "steps": self.steps, **super()._init_args()}

    def _range(self, spec: QSpec) -> Range:
        h = self.hist
        r = torch.arange(1, self.steps + 1, dtype=torch.float64) / self.steps
        if spec.symmetric:
            amax = max(-h.min_seen, h.max_seen)
            lo = torch.clamp(-amax * r, min=h.min_seen)
            hi = torch.clamp(amax * r, max=h.max_seen)
        else:
            lo, hi = min(h.min_seen, 0.0) * r, max(h.max_seen, 0.0) * r
        scale, zp = compute_qparams(lo.float(), hi.float(), spec)
        s, z = scale.double()[:, None], zp.double()[:, None]
        clip_lo, clip_hi = s * (spec.qmin - z), s * (spec.qmax - z)
        e = h.edges()
        centers = torch.from_numpy((e[1:] + e[:-1]) / 2)[None, :]
        outside = (centers - centers.clamp(clip_lo, clip_hi)).abs().pow(self.p)
        inside = (s / 2).pow(self.p) / (self.p + 1)
        err = torch.where((centers >= clip_lo) & (centers <= clip_hi), inside.expand_as(outside), outside)
        best = int((err * h.counts[None, :]).sum(1).argmin())
        return self._clip(float(lo[best]), float(hi[best]))


class EntropyObserver(_HistogramObserver):
    """KL-divergence threshold search on the |x| histogram (TensorRT's entropy calibration): for each
    candidate threshold i (in bins), the reference P is the first i bins with the tail mass added to
    the last, the candidate Q is P merged into 2^(bits−1) levels (2^bits for unsigned) and spread
    back over P's non-empty bins; the threshold with the least KL(P‖Q) wins. The range is (−t, t)
    clipped to what was observed."""

    name = "entropy"

    def __init__(self, bins: int = 4096, amax: float | None = None, stride: int = 1) -> None:
        if stride < 1:
            raise SpecError(f"entropy observer stride must be >= 1, got {stride}")
        super().__init__(bins, amax)
        self.stride = stride

    def _init_args(self) -> dict:
        return {"stride": self.stride, **super()._init_args()}

    def _range(self, spec: QSpec) -> Range:
        folded, w = self.hist.folded()
        # exact zeros (ReLU outputs) are exact at any threshold; left in, their spike drags the threshold
        # down to where one level holds one bin
        folded = folded.copy()
        folded[0] = max(folded[0] - self.hist.zeros, 0.0)
        # levels on |x|: all of them when the data is one-signed, half when it spans both signs
        one_sided = self.hist.min_seen >= 0 or self.hist.max_seen <= 0
        nlev = 1 << (spec.bits if one_sided and not spec.symmetric else spec.bits - 1)
        last = int(np.flatnonzero(folded)[-1]) + 1 if folded.any() else 1
        if last <= nlev:
            return self._symmetric(last * w)
        cands = torch.arange(nlev, last + 1, self.stride)
        kl = _kl_divergences(torch.from_numpy(folded[:last].copy()), cands, nlev)
        best_i = int(cands[int(kl.argmin())])
        return self._symmetric(best_i * w)


def _xlogx(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v > 0, v * v.clamp_min(1e-300).log(), 0.0)


def _kl_divergences(h: torch.Tensor, cands: torch.Tensor, nlev: int) -> torch.Tensor:
    """KL(P‖Q) for each threshold bin i in ``cands`` (float64 ``h``): P = h[:i] with the tail mass
    sum(h[i:]) added to its last bin; Q = h[:i] merged into nlev equal spans of bins (level l holds
    bins b with floor(b·nlev/i) = l), each span's mass spread evenly over its non-empty bins; inf where
    Q misses mass that P has (the tail on an empty last bin). Q is constant on a span, so KL needs only per-span sums, taken from
    prefix sums: O(len(cands) · nlev)."""
    zero = torch.zeros(1, dtype=torch.float64)
    ch = torch.cat([zero, h.cumsum(0)])  # ch[k] = sum(h[:k])
    cn = torch.cat([zero, (h > 0).to(torch.float64).cumsum(0)])
    cxl = torch.cat([zero, _xlogx(h).cumsum(0)])
    total = ch[-1]
    i = cands[:, None]
    bounds = (torch.arange(nlev + 1)[None, :] * i + nlev - 1) // nlev  # first bin of each level, and i
    tot = ch[bounds[:, 1:]] - ch[bounds[:, :-1]]
    cnt = cn[bounds[:, 1:]] - cn[bounds[:, :-1]]
    tail = total - ch[cands]
    last = h[cands - 1]
    p_lev = tot.clone()
    p_lev[:, -1] += tail
    plogp = cxl[cands - 1] + _xlogx(last + tail)
    dens = tot / cnt.clamp_min(1)
    qsum = ch[cands]
    cross = torch.where(p_lev > 0, p_lev * (dens.clamp_min(1e-300).log() - qsum[:, None].log()), 0.0).sum(1)
    kl = plogp / total - total.log() - cross / total
    missing = (last == 0) & (tail > 0)  # the tail lands on an empty bin, where Q is 0
    return torch.where(missing, math.inf, kl)


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}
assert tuple(OBSERVERS) == OBSERVER_NAMES


def make_observer(name: str, **opts) -> Observer:
    """Build a registered observer by name with its options (e.g. ``percentile=99.9``, ``axis=0``)."""
    if name not in OBSERVERS:
        raise SpecError(f"unknown observer {name!r}; valid observers: {', '.join(OBSERVERS)}")
    cls = OBSERVERS[name]
    if opts.get("axis") is not None and not cls.per_channel_ok:
        raise SpecError(f"observer {name!r} is per-tensor only; per-channel needs 'minmax' or 'moving_average'")
    opts = {k: v for k, v in opts.items() if k != "axis" or cls.per_channel_ok}
    try:
        return cls(**opts)
    except TypeError as e:
        raise SpecError(f"bad options {sorted(opts)} for observer {name!r}: {e}") from None


def observer_for(spec: QSpec, **opts) -> Observer:
    """The observer ``spec.observer`` names, per channel along ``spec.axis`` for channel specs."""
    if spec.scheme != "uniform":
        raise SpecError(f"observers calibrate uniform specs; got {spec}")
    if spec.granularity == "group":
        raise SpecError("group granularity is for weights: use qgraph.quant.uniform.quantize_weight")
    if spec.granularity == "channel":
        opts = {"axis": spec.axis, **opts}
    return make_observer(spec.observer, **opts)
