"""`Constraints`: hard limits on bytes, latency, average weight bits and metric drop."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Constraints:
    """Hard limits; None means unconstrained. ``max_metric_drop`` is measured against float (cosine: 1 − cos
    gap; perplexity: increase)."""

    max_bytes: float | None = None
    max_latency_us: float | None = None
    avg_bits: float | None = None
    max_metric_drop: float | None = None

    def analytic_violation(self, nbytes: float, latency_us: float, avg_bits: float) -> float:
        """Sum of relative excesses over the limits known before evaluation (0: all met)."""
        v = 0.0
        for value, cap in ((nbytes, self.max_bytes), (latency_us, self.max_latency_us), (avg_bits, self.avg_bits)):
            if cap is not None and value > cap * (1 + 1e-12):
                v += (value - cap) / max(cap, 1e-12)
        return v

    def metric_ok(self, drop: float) -> bool:
        return self.max_metric_drop is None or drop <= self.max_metric_drop + 1e-12

    def describe(self) -> str:
        parts = []
        if self.max_bytes is not None:
            parts.append(f"bytes ≤ {self.max_bytes / 1e6:.3f} MB")
        if self.avg_bits is not None:
            parts.append(f"avg weight bits ≤ {self.avg_bits:g}")
        if self.max_latency_us is not None:
            parts.append(f"predicted latency ≤ {self.max_latency_us:.1f} µs")
        if self.max_metric_drop is not None:
            parts.append(f"metric drop ≤ {self.max_metric_drop:g}")
        return ", ".join(parts) or "none"
