"""AdaRound: learned rounding of a uniformly quantized weight (pure tensor functions).

Math (``s``: scale, ``z``: zero point, both broadcast to the weight from the spec's granularity; ``[qmin,
qmax]`` from the spec):
- ``W_soft = s · (clamp(⌊W/s⌋ + z + h(V), qmin, qmax) − z)``, with the rectified sigmoid
  ``h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)``, ``ζ = 1.1``, ``γ = −0.1``. ``V`` starts where ``h(V)`` equals the
  fractional part ``W/s − ⌊W/s⌋`` (so ``W_soft = W`` inside the clip range at the start).
- Loss: reconstruction error + ``λ Σ (1 − |2h − 1|^β)``; the regulariser is off for the first ``warmup``
  fraction of the iterations, then ``β`` decays linearly from 20 to 2. At the end the rounding is made hard:
  ``code = clamp(⌊W/s⌋ + z + [h ≥ 0.5], qmin, qmax)``, so every code is one of the two grid points around
  ``W/s`` (clamped into range).
- Layer-wise reconstruction (`adaround`): the error of the layer output ``Σ_o mean_n (w_o·x_n − ŵ_o·x̂_n)²``
  (summed over outputs, averaged over input rows), where ``x`` are the layer's float inputs and ``x̂`` the
  inputs the quantized layer sees (from the quantized prefix and/or fake-quantized). With ``D = Ŵ − W`` and
  ``e = x̂ − x`` it is ``Σ_o [d_oᵀ H d_o + 2 d_oᵀ C w_o + w_oᵀ E w_o]``, ``H = X̂ᵀX̂/N``, ``C = X̂ᵀE/N``,
  ``E = EᵀE/N`` (`LayerInputStats` accumulates them), so the loss over *all* calibration rows is exact and
  costs ``O(out · K²)`` per step. While the row count ``N`` is below ``K`` the rows themselves are kept
  instead (``O(out · K · N)`` per step). Grouped convolutions carry one statistic per group.
Arithmetic: statistics in float64, optimisation in float32 (CPU).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from qgraph.errors import SpecError
from qgraph.quant import uniform
from qgraph.quant.qspec import QSpec
from qgraph.quant.qtensor import UniformWeight

ZETA = 1.1
GAMMA = -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """A ``V`` with ``h(V) = h`` for ``h`` in [0, 1] (finite: ``σ(V)`` stays inside (0, 1))."""
    p = (h - GAMMA) / (ZETA - GAMMA)
    return torch.log(p) - torch.log1p(-p)


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """``Σ (1 − |2h − 1|^β)``: zero only when every ``h`` is 0 or 1."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


@dataclass(frozen=True)
class Anneal:
    """Regulariser schedule: off for the first ``warmup`` fraction of ``iters``, then β from ``beta_start``
    down to ``beta_end`` linearly."""

    iters: int
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0

    def beta(self, t: int) -> float | None:
        """β at step ``t`` (0-based), or None while the regulariser is off."""
        start = int(self.warmup * self.iters)
        if t < start:
            return None
        frac = (t - start) / max(1, self.iters - start - 1)
        return self.beta_start + (self.beta_end - self.beta_start) * min(1.0, frac)


def _as_rows(cols: torch.Tensor) -> torch.Tensor:
    """Columns ``[B, G, K, L]`` as rows ``[B·L, G, K]`` (a copy)."""
    return cols.permute(0, 3, 1, 2).reshape(-1, cols.shape[1], cols.shape[2]).clone()


def check_options(iters: int, lr: float, reg: float, warmup: float) -> None:
    if iters < 0 or not lr > 0 or not reg >= 0 or not 0.0 <= warmup <= 1.0:
        raise SpecError(f"learned rounding needs iters >= 0, lr > 0, reg >= 0 and 0 <= warmup <= 1; "
                        f"got iters={iters}, lr={lr}, reg={reg}, warmup={warmup}")


def _expand(scale: torch.Tensor, zp: torch.Tensor, w: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point broadcast to ``w``'s full shape (float32)."""
    s = uniform._apply(lambda x, s, z: s.expand_as(x).to(torch.float32), w, scale, zp, spec)
    z = uniform._apply(lambda x, s, z: z.to(torch.float32).expand_as(x), w, scale, zp, spec)
    return s.contiguous(), z.contiguous()


class LearnedRounding(nn.Module):
    """Rounding variables ``V`` for one weight under a uniform spec; qparams from the uniform quantizer
    (`qgraph.quant.uniform.quantize_weight`, optionally with its Lp clip search)."""

    def __init__(self, w: torch.Tensor, spec: QSpec, *, clip_search: bool = False, p: float = 2.4):
        super().__init__()
        if spec.scheme != "uniform":
            raise SpecError(f"learned rounding (AdaRound / BRECQ) rounds onto a uniform grid; got {spec}: use "
                            f"gptq (which takes the BCQ quantizer) or quantize-weights for BCQ layers")
        w = w.detach().to(device="cpu", dtype=torch.float32)
        spec.check_tensor(w.shape)
        self.spec = spec
        self.register_buffer("w", w)
        rtn_codes, scale, zp = uniform.quantize_weight(w, spec, clip_search=clip_search, p=p)
        self.scale, self.zero_point, self.rtn_codes = scale, zp, rtn_codes
        s, z = _expand(scale, zp, w, spec)
        self.register_buffer("s", s)
        self.register_buffer("z", z)
        ratio = w / s
        base = torch.floor(ratio)
        self.register_buffer("base", base + z)  # ⌊W/s⌋ + z
        frac = (ratio - base).clamp(0.0, 1.0)
        self.v = nn.Parameter(inverse_rectified_sigmoid(frac))
        # For h in [0, 1], clamp(b + h, qmin, qmax) is b + h where qmin <= b < qmax and a constant elsewhere,
        # so W_soft = c0 + m·h with c0 = s (clamp(b, qmin, qmax) − z) and m = s [qmin <= b < qmax].
        b = self.base
        self.register_buffer("c0", (b.clamp(spec.qmin, spec.qmax) - z) * s)
        self.register_buffer("m", s * ((b >= spec.qmin) & (b < spec.qmax)).to(torch.float32))

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v)

    def soft(self) -> torch.Tensor:
        """``W_soft = s (clamp(⌊W/s⌋ + z + h(V), qmin, qmax) − z)`` (differentiable in ``V``)."""
        return torch.addcmul(self.c0, self.m, self.h())

    def codes(self) -> torch.Tensor:
        """Hard codes: ``clamp(⌊W/s⌋ + z + [h ≥ 0.5], qmin, qmax)`` (int8 signed / uint8 unsigned)."""
        with torch.no_grad():
            up = (self.h() >= 0.5).to(torch.float32)
            q = torch.clamp(self.base + up, self.spec.qmin, self.spec.qmax)
        return q.to(torch.int8 if self.spec.signed else torch.uint8)

    def hard(self) -> torch.Tensor:
        """The float value of the hard codes."""
        return (self.codes().to(torch.float32) - self.z) * self.s

    def rtn(self) -> torch.Tensor:
        """The float value of round-to-nearest with the same qparams."""
        return (self.rtn_codes.to(torch.float32) - self.z) * self.s

    def qweight(self, rtn: bool = False) -> UniformWeight:
        codes = self.rtn_codes if rtn else self.codes()
        return UniformWeight(codes.contiguous(), self.scale, self.zero_point, self.spec)

    def regularizer(self, beta: float) -> torch.Tensor:
        return rounding_regularizer(self.h(), beta)

    @torch.no_grad()
    def add_regularizer_grad(self, beta: float, weight: float) -> None:
        """Add ``weight · ∂/∂V Σ(1 − |2h − 1|^β)`` to ``V.grad``, by hand (one pow instead of autograd's two):
        ``∂/∂h = −2β |2h − 1|^(β−1) sign(2h − 1)`` and ``∂h/∂V = (ζ − γ) σ(V)(1 − σ(V))`` where h is not clipped."""
        sig = torch.sigmoid(self.v)
        hr = sig * (ZETA - GAMMA) + GAMMA
        t = hr.clamp(0.0, 1.0).mul_(2.0).sub_(1.0)
        g = t.abs().pow_(beta - 1.0).mul_(t.sign_()).mul_(-2.0 * beta * weight * (ZETA - GAMMA))
        g.mul_(sig).mul_(sig.neg_().add_(1.0)).mul_((hr > 0) & (hr < 1))
        if self.v.grad is None:
            self.v.grad = g
        else:
            self.v.grad.add_(g)


class LayerInputStats:
    """Exact output-error statistics of one layer over all its calibration inputs (see the module docstring).

    Inputs come as columns ``x_hat [B, G, K, L]`` (what the quantized layer sees: ``B × L`` input vectors of
    ``K`` per group, e.g. a convolution's patches) and optionally ``err = x_hat − x`` of the same shape (None
    when the quantized layer sees the float inputs). While there are at most ``K`` vectors they are kept;
    past that, they are folded into Gram matrices (``H``, ``C``, ``E``; float64 accumulators).
    """

    def __init__(self, groups: int, k: int):
        self.g, self.k = int(groups), int(k)
        self.n = 0
        self.rows: list[tuple[torch.Tensor, torch.Tensor | None]] | None = []
        self.h = self.c = self.e = None
        self.has_err = False

    def add(self, x_hat: torch.Tensor, err: torch.Tensor | None = None) -> None:
        if x_hat.dim() != 4 or x_hat.shape[1:3] != (self.g, self.k):
            raise SpecError(f"layer input columns must be [B, {self.g}, {self.k}, L], got {tuple(x_hat.shape)}")
        x_hat = x_hat.detach().to(device="cpu", dtype=torch.float32)
        if err is not None:
            err = err.detach().to(device="cpu", dtype=torch.float32)
            self.has_err = True
        self.n += x_hat.shape[0] * x_hat.shape[3]
        if self.rows is not None:
            self.rows.append((_as_rows(x_hat), _as_rows(err) if err is not None else None))
            if self.n > self.k:
                rows, self.rows = self.rows, None
                for xh, er in rows:
                    self._fold(xh.permute(1, 2, 0)[None], er.permute(1, 2, 0)[None] if er is not None else None)
            return
        self._fold(x_hat, err)

    def _fold(self, x_hat: torch.Tensor, err: torch.Tensor | None) -> None:
        if self.h is None:
            self.h = torch.zeros(self.g, self.k, self.k, dtype=torch.float64)
            self.c = torch.zeros_like(self.h)
            self.e = torch.zeros_like(self.h)
        self.h += torch.matmul(x_hat, x_hat.transpose(-1, -2)).sum(0).to(torch.float64)
        if err is not None:
            self.c += torch.matmul(x_hat, err.transpose(-1, -2)).sum(0).to(torch.float64)
            self.e += torch.matmul(err, err.transpose(-1, -2)).sum(0).to(torch.float64)

    def loss_fn(self, w: torch.Tensor):
        """``f(Ŵ) -> error`` (float32, differentiable) for a float weight viewed as ``[G, O, K]``, and the
        exact float64 ``error(Ŵ)`` for reporting."""
        if self.n == 0:
            raise SpecError("no calibration rows reached this layer")
        w = w.detach().to(torch.float32)
        if self.rows is not None:
            xh = torch.cat([r[0] for r in self.rows]).transpose(0, 1).contiguous()  # [G, N, K]
            if self.has_err:
                er = torch.cat([r[1] if r[1] is not None else torch.zeros_like(r[0]) for r in self.rows])
                const = torch.bmm(er.transpose(0, 1), w.transpose(1, 2))  # [G, N, O]: E Wᵀ
            else:
                const = None
            n = self.n

            def f(w_hat, exact=False):
                dt = torch.float64 if exact else torch.float32
                d = (w_hat.to(dt) - w.to(dt))
                out = torch.bmm(xh.to(dt), d.transpose(1, 2))
                if const is not None:
                    out = out + const.to(dt)
                return out.pow(2).sum() / n

            return f
        h = self.h / self.n
        # rows of P are (C w_o)ᵀ, so the cross term 2 Σ_o d_oᵀ C w_o is 2 Σ P∘D
        p64 = torch.bmm(w.to(torch.float64), (self.c / self.n).transpose(1, 2)) if self.has_err else None
        c64 = float(((torch.bmm(w.to(torch.float64), self.e / self.n)) * w.to(torch.float64)).sum()) \
            if self.has_err else 0.0
        h32 = h.to(torch.float32)
        p32 = p64.to(torch.float32) if p64 is not None else None

        def f(w_hat, exact=False):
            if exact:
                d = w_hat.to(torch.float64) - w.to(torch.float64)
                val = (torch.bmm(d, h) * d).sum()
                if p64 is not None:
                    val = val + 2 * (p64 * d).sum() + c64
                return val
            d = w_hat - w
            val = (torch.bmm(d, h32) * d).sum()
            if p32 is not None:
                val = val + 2 * (p32 * d).sum() + c64
            return val

        return f

    def energy(self, w: torch.Tensor) -> float:
        """``mean_n ‖W x_n‖²`` of the float layer (the scale errors are measured against)."""
        w64 = w.detach().to(torch.float64)
        if self.rows is not None:
            x = torch.cat([r[0] - (r[1] if r[1] is not None else 0) for r in self.rows]).transpose(0, 1)
            return float(torch.bmm(x.to(torch.float64), w64.transpose(1, 2)).pow(2).sum() / self.n)
        hf = (self.h - self.c - self.c.transpose(1, 2) + self.e) / self.n  # XᵀX/N with X = X̂ − E
        return float((torch.bmm(w64, hf) * w64).sum())


@dataclass(frozen=True)
class AdaRoundResult:
    """``qweight``: the `UniformWeight`; ``w_hat``: its float value; ``rtn_error`` / ``error``: the exact
    reconstruction error of round-to-nearest / of the result over all calibration rows; ``energy``: the float
    output's own ``mean ‖Wx‖²``; ``flipped``: fraction of codes that differ from round-to-nearest;
    ``kept_rtn``: the learned rounding was not better than round-to-nearest, which was kept."""

    qweight: UniformWeight
    w_hat: torch.Tensor
    rtn_error: float
    error: float
    energy: float
    flipped: float
    kept_rtn: bool


def optimize(rounders: list[LearnedRounding], loss_fn, *, iters: int, lr: float, reg: float,
             warmup: float = 0.2, beta: tuple[float, float] = (20.0, 2.0)) -> list[float]:
    """Adam on the ``V`` of ``rounders`` against ``loss_fn(step) -> reconstruction loss`` plus
    ``reg · mean(1 − |2h − 1|^β)`` over all their rounding variables, annealed (see `Anneal`). Callers
    normalise the reconstruction loss (by round-to-nearest's), so ``reg`` means the same for any layer.
    Returns the reconstruction loss every step."""
    check_options(iters, lr, reg, warmup)
    params = [r.v for r in rounders]
    per_var = reg / max(1, sum(p.numel() for p in params))
    opt = torch.optim.Adam(params, lr=lr)
    sched = Anneal(iters, warmup, beta[0], beta[1])
    history = []
    for t in range(iters):
        opt.zero_grad(set_to_none=True)
        rec = loss_fn(t)
        rec.backward()
        b = sched.beta(t)
        if b is not None and reg > 0:
            for r in rounders:
                r.add_regularizer_grad(b, per_var)
        opt.step()
        history.append(float(rec.detach()))
    return history


def adaround(
    w: torch.Tensor,
    spec: QSpec,
    stats: LayerInputStats,
    *,
    iters: int = 500,
    lr: float = 0.1,
    reg: float = 3.0,
    warmup: float = 0.2,
    beta: tuple[float, float] = (20.0, 2.0),
    clip_search: bool = False,
    p: float = 2.4,
    keep_best: bool = True,
) -> AdaRoundResult:
    """Learn the rounding of ``w`` (``[out, ...]``; viewed as ``[G, out/G, K]`` to match ``stats``) so that
    the layer output over the calibration rows in ``stats`` moves as little as possible."""
    check_options(iters, lr, reg, warmup)
    r = LearnedRounding(w, spec, clip_search=clip_search, p=p)
    g = stats.g
    view = (g, w.shape[0] // g, -1)
    wv = r.w.reshape(view)
    if wv.shape[2] != stats.k:
        raise SpecError(f"adaround: weight {tuple(w.shape)} in {g} group(s) does not match layer rows of {stats.k}")
    f = stats.loss_fn(wv)
    rtn_w = r.rtn()
    rtn_err = float(f(rtn_w.reshape(view), exact=True))
    with torch.enable_grad(), uniform.one_thread():
        if rtn_err > 0:
            optimize([r], lambda t: f(r.soft().reshape(view)) / rtn_err, iters=iters, lr=lr, reg=reg,
                     warmup=warmup, beta=beta)
        hard_w = r.hard()
        err = float(f(hard_w.reshape(view), exact=True))
    kept = keep_best and not err < rtn_err
    codes = r.rtn_codes if kept else r.codes()
    flipped = float((codes != r.rtn_codes).float().mean())
    q = r.qweight(rtn=kept)
    return AdaRoundResult(q, rtn_w if kept else hard_w, rtn_err, rtn_err if kept else err,
                          stats.energy(wv), flipped, kept)


def relative(err: float, energy: float) -> float:
    return err / energy if energy > 0 and math.isfinite(energy) else float("nan")
