"""SmoothQuant's per-channel scales and the choice of α by the quantized output error on calibration rows.

For ``y = x Wᵀ`` with per-input-channel maxima ``a_j = max|x_j|`` and ``w_j = max_i |W_ij|``:
``s_j = a_j^α / w_j^(1−α)``, ``x' = x / s``, ``W' = W · diag(s)`` (Xiao et al., "SmoothQuant", 2023).
`alpha_losses` measures, for each α of a grid, the relative output error ``‖Q(x') Q(W')ᵀ − x Wᵀ‖² / ‖x Wᵀ‖²`` of
every layer on sampled calibration rows (activations quantized by their spec: dynamic scales per token /
tensor, or static per-tensor ranges from the rows; weights by theirs), averaged over layers so each counts the
same; `best_alpha` keeps the α with the smallest mean.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from qgraph.errors import SpecError
from qgraph.quant import uniform
from qgraph.quant.qspec import QSpec


def smoothing_scales(a: torch.Tensor, w: torch.Tensor, alpha: float, floor: float = 1e-5) -> torch.Tensor:
    """``s = a^α / w^(1−α)`` per input channel, every factor floored at ``floor``."""
    if not 0.0 <= alpha <= 1.0:
        raise SpecError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    return (a.clamp_min(floor).pow(alpha) / w.clamp_min(floor).pow(1 - alpha)).clamp_min(floor)


def _fake_quant_activation(x: torch.Tensor, spec: QSpec) -> torch.Tensor:
    if spec.dynamic:
        return uniform.fake_quantize_dynamic(x, spec)
    static = spec.replace(granularity="tensor")
    scale, zp = uniform.compute_qparams(x.min(), x.max(), static)
    return uniform.fake_quantize(x, scale, zp, static)


def _fake_quant_weight(w: torch.Tensor, spec: QSpec | None) -> torch.Tensor:
    if spec is None or spec.scheme != "uniform":
        return w
    codes, scale, zp = uniform.quantize_weight(w, spec)
    return uniform.dequantize(codes, scale, zp, spec)


def smoothed_error(x: torch.Tensor, weights: Sequence[torch.Tensor], a: torch.Tensor, alpha: float,
                   act_spec: QSpec, weight_specs: Sequence[QSpec | None], floor: float = 1e-5) -> float:
    """Mean over ``weights`` (Linears reading the same ``x`` rows ``[R, K]``) of the relative output error after
    smoothing with ``alpha`` and quantizing both operands."""
    wmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0).float()
    s = smoothing_scales(a, wmax, alpha, floor)
    xq = _fake_quant_activation(x / s, act_spec)
    errs = []
    for w, ws in zip(weights, weight_specs):
        ref = x @ w.t()
        y = xq @ _fake_quant_weight(w * s[None, :], ws).t()
        errs.append(float((y - ref).square().sum() / ref.square().sum().clamp_min(1e-30)))
    return sum(errs) / len(errs)


def best_alpha(losses: dict[float, float]) -> float:
    """The α of the smallest loss (the smaller α on a tie)."""
    if not losses:
        raise SpecError("no α to choose from: give at least one candidate")
    return min(sorted(losses), key=lambda k: losses[k])
