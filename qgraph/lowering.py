"""Helpers shared by the lowering passes: the simulation snapshot and the lowering report."""
from __future__ import annotations

from typing import Any

from qgraph.ir.meta import LOWERED_FROM_KEY
from qgraph.target import load_target

SIMULATION = "simulation"
__all__ = ["LOWERED_FROM_KEY", "SIMULATION", "record", "snapshot_simulation", "target_of", "weight_layout"]


def snapshot_simulation(graph: Any, ctx: Any) -> None:
    """Keep a copy of the graph as it was before the first lowering pass (for ``verify``)."""
    if SIMULATION not in ctx.artifacts:
        ctx.artifacts[SIMULATION] = graph.copy()


def record(ctx: Any, node: str, op: str, kernel: str, status: str, reason: str = "") -> None:
    """Append one row to the lowering report: ``status`` is "lowered" or "float"."""
    ctx.report.setdefault("lowering", []).append(
        {"node": node, "op": op, "kernel": kernel, "status": status, "reason": reason})


def target_of(ctx: Any):
    t = ctx.target if ctx.target is not None else load_target("generic")
    return load_target(t) if isinstance(t, str) else t


def weight_layout(graph, node, op: str | None = None) -> str | None:
    """``graph.weight_layout(node)``: ``"nk"`` when `param` gives the weight as ``[out, in]``, ``"kn"`` for
    ``[in, out]``, None otherwise (kept for callers written before `GraphView.weight_layout`)."""
    return graph.weight_layout(node)
