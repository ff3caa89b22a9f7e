"""Activation statistics for round-to-nearest weight quantization of ``y = x Wᵀ`` layers.

The output error of a quantized Linear is ``X (W − Ŵ)ᵀ``; its expectation over inputs is
``Σ_m (w_m − ŵ_m)ᵀ H (w_m − ŵ_m)`` with ``H = E[x xᵀ]``. Keeping only the diagonal of H gives a
per-element importance ``m_mk = E[x_k²]``: the weighted BCQ objective Σ m (w − ŵ)² becomes the output error
with the input channels treated as uncorrelated (the importance-weighted BCQ of "Post-training weighted
quantization of neural networks for language models" with the input's scale as the measure of importance).
On SmolLM2 this is what keeps BCQ from collapsing: the attention-sink token carries values near 800 in a few
residual channels, so the columns of W that read them must be kept nearly exact, which magnitude importance
(large |w| matters most) gets backwards. Collecting E[x_k²] costs one float64 vector per layer input.
"""
from __future__ import annotations

import torch

from qgraph.errors import CalibrationError, SpecError


class ChannelMoments:
    """Running ``E[x_k²]`` over every dimension of ``x [..., K]`` but the last (float64 accumulators)."""

    def __init__(self) -> None:
        self.sum_sq: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(device="cpu", dtype=torch.float64)
        s = x.square().sum(0)
        if self.sum_sq is not None and self.sum_sq.shape != s.shape:
            raise CalibrationError(f"calibration inputs changed width: {self.sum_sq.numel()} then {s.numel()}")
        self.sum_sq = s if self.sum_sq is None else self.sum_sq + s
        self.count += x.shape[0]

    def mean_square(self) -> torch.Tensor:
        """``E[x_k²]`` as float64 ``[K]``."""
        if self.sum_sq is None or self.count == 0:
            raise CalibrationError("no calibration values were seen for this layer input")
        return self.sum_sq / self.count


def activation_importance(w: torch.Tensor, mean_square: torch.Tensor, floor: float = 1e-8) -> torch.Tensor:
    """Per-element importance ``m [M, K] = E[x_k²]`` of a weight ``w [M, K]`` of ``y = x Wᵀ``, for
    `qgraph.quant.bcq.quantize_bcq`'s ``importance``. Channels that never fire get ``floor`` times the largest
    moment, so every group keeps a solvable least-squares step."""
    if w.dim() != 2 or mean_square.dim() != 1 or mean_square.numel() != w.shape[1]:
        raise SpecError(f"activation_importance needs w [M, K] and E[x^2] [K]; got {tuple(w.shape)} and "
                        f"{tuple(mean_square.shape)}")
    d = mean_square.detach().to(torch.float64)
    if not torch.isfinite(d).all() or (d < 0).any():
        raise CalibrationError("activation statistics hold inf/nan or negative values; check the calibration data")
    d = d.clamp_min(float(d.max()) * floor + 1e-300)
    return d[None, :].expand(w.shape[0], -1).to(torch.float32)


def relative_output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """``‖X (Ŵ − W)ᵀ‖ / ‖X Wᵀ‖`` over the rows of ``x [..., K]`` (float64)."""
    return output_errors(x, w, w_hat)[0]


def output_errors(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> tuple[float, float]:
    """(``‖X (Ŵ − W)ᵀ‖ / ‖X Wᵀ‖`` over all rows of ``x [..., K]``, the largest per-row ratio ``‖x (Ŵ − W)ᵀ‖ /
    ‖x Wᵀ‖``). The second sees one token gone wrong, e.g. an attention sink whose output must stay near 0."""
    x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    w64 = w.detach().to(torch.float64)
    y = x2 @ w64.T
    e = x2 @ (w_hat.detach().to(torch.float64) - w64).T
    total = float(e.norm() / y.norm().clamp_min(1e-300))
    per_row = e.norm(dim=1) / y.norm(dim=1).clamp_min(1e-12 * float(y.norm(dim=1).max()) + 1e-300)
    return total, float(per_row.max())
