"""Measured per-node latency on the host, to calibrate the cost model's predictions."""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import fx


class _TimingInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, timings: dict[str, list[float]]):
        super().__init__(gm)
        self.timings = timings

    def run_node(self, n: fx.Node) -> Any:
        if n.op not in ("call_module", "call_function", "call_method"):
            return super().run_node(n)
        start = time.perf_counter()
        out = super().run_node(n)
        self.timings.setdefault(n.name, []).append((time.perf_counter() - start) * 1e6)
        return out


def measure_node_latency(graph: Any, inputs: tuple | None = None, *, repeats: int = 10,
                         warmup: int = 2) -> dict[str, float]:
    """Median wall time (µs) of each compute node, running the graph node by node."""
    inputs = inputs if inputs is not None else graph.example_inputs
    timings: dict[str, list[float]] = {}
    with torch.no_grad():
        for i in range(warmup + repeats):
            interp = _TimingInterpreter(graph.gm, timings if i >= warmup else {})
            interp.run(*inputs)
    return {name: statistics.median(ts) for name, ts in timings.items()}
