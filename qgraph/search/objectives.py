"""What is known about a strategy and what a trial records: `Analytic` (bytes, bits, predicted latency, limit
violation), `Trial`, choice summaries and the sensitivity loss. The evaluation machinery lives in its own
modules (metrics, constraints, costs, splits, qweight_store, workbench); their names are re-exported here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from qgraph.search.constraints import Constraints
from qgraph.search.costs import CostTable, cost_table
from qgraph.search.metrics import METRICS, Metric, cosine_rows, first_tensor, perplexity_of
from qgraph.search.qweight_store import optimized_dir
from qgraph.search.space import Assignment, Space
from qgraph.search.splits import SPLITS, eval_plays, eval_sentences, sensitivity_play
from qgraph.search.strategy import Strategy
from qgraph.search.workbench import (
    QWEIGHT_VERSION,
    SEARCH_VERSION,
    TRIAL_PIPELINE,
    EvalConfig,
    Workbench,
    fresh_copy,
)

__all__ = ["METRICS", "QWEIGHT_VERSION", "SEARCH_VERSION", "SPLITS", "TRIAL_PIPELINE", "Analytic", "Constraints",
           "CostTable", "EvalConfig", "Metric", "Trial", "Workbench", "analytic", "cosine_rows", "cost_table",
           "effective_bits", "eval_plays", "eval_sentences", "first_tensor", "fresh_copy", "make_loss_fn",
           "make_loss_parts", "optimized_dir", "perplexity_of", "sensitivity_play", "summarize"]


# --- analytic objectives ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Analytic:
    """What is known about an assignment without running it."""

    bytes: int
    avg_bits: float
    latency_us: float
    violation: float

    @property
    def feasible(self) -> bool:
        return self.violation == 0.0


def analytic(space: Space, costs: CostTable, constraints: Constraints, a: Assignment) -> Analytic:
    nbytes, bits, lat = space.weight_bytes(a), space.avg_bits(a), costs.predict(a)
    return Analytic(nbytes, bits, lat, constraints.analytic_violation(nbytes, lat, bits))


@dataclass
class Trial:
    """One evaluated strategy: assignment, analytic objectives and measured metric."""

    assignment: Assignment
    strategy: Strategy
    analytic: Analytic
    metric: float
    drop: float
    feasible: bool
    cached: bool = False
    measured_latency_us: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def objectives(self, metric: Metric, use_latency: bool = False) -> tuple[float, ...]:
        """Minimisation objectives: (error, bytes[, latency])."""
        obj = (metric.error(self.metric), float(self.analytic.bytes))
        return obj + (self.analytic.latency_us,) if use_latency else obj


def summarize(space: Space, a: Assignment) -> dict[str, int]:
    """How many searched layers use each choice label."""
    out: dict[str, int] = {}
    for i in space.searchable:
        label = space.layers[i].choices[a[i]].label
        out[label] = out.get(label, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def effective_bits(space: Space, a: Assignment) -> float:
    """Stored bits per weight of the searched layers, scales and offsets included."""
    idx = space.counted_for_bits
    n = sum(space.layers[i].numel for i in idx)
    b = sum(space.layers[i].bytes_of(a[i]) for i in idx)
    return 8.0 * b / max(n, 1)


def make_loss_fn(bench: Workbench) -> Callable[[torch.nn.Module], torch.Tensor]:
    """The sensitivity loss of a module on the workbench's sensitivity batches."""
    def loss(gm: torch.nn.Module) -> torch.Tensor:
        total = 0.0
        for b, ref in zip(bench.data.sens_batches, bench.sens_reference):
            total = total + bench.loss(first_tensor(gm(*b)), ref)
        return total / max(len(bench.data.sens_batches), 1)

    return loss


def make_loss_parts(bench: Workbench) -> list[Callable[[torch.nn.Module], torch.Tensor]]:
    """`make_loss_fn`'s loss as one part per sensitivity batch (the parts sum to it)."""
    n = max(len(bench.data.sens_batches), 1)

    def part(b: tuple, ref: torch.Tensor) -> Callable[[torch.nn.Module], torch.Tensor]:
        return lambda gm: bench.loss(first_tensor(gm(*b)), ref) / n

    return [part(b, ref) for b, ref in zip(bench.data.sens_batches, bench.sens_reference)]
