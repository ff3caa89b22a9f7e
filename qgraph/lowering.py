"""Helpers shared by the lowering passes: the simulation snapshot and the lowering report."""
from __future__ import annotations

from typing import Any

from qgraph.target import load_target

SIMULATION = "simulation"
LOWERED_FROM_KEY = "qgraph.lowered_from"


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


def weight_layout(graph, node, op: str) -> str | None:
    """``"nk"`` when the weight is ``[out, in]`` (Linear, linear, Conv), ``"kn"`` when it is the right
    operand of a matmul ``[in, out]`` (MatMul, addmm); None for anything else (batched weights)."""
    w = graph.param(node, "weight")
    if w is None:
        return None
    if op == "Conv":
        return "nk"
    if w.dim() != 2:
        return None
    if op == "Gemm":
        return "kn" if node.op == "call_function" and "addmm" in str(node.target) else "nk"
    return "kn"
