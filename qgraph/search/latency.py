"""Measured latency of the kernels a lowered strategy runs, per (layer shape, kernel, path), cached per machine.

The roofline cost model (`qgraph.search.costs`) predicts latency for any target; for the machine the search
runs on, this module times the real kernels instead: fp32 ``F.linear``, BiQGEMM (``torch.ops.qgraph.biqgemm``,
``exact`` or ``fast`` tables; uniform 2-4-bit codes run in their exact BCQ form, as the LM path lowers them)
and int8 weight-only (``qgraph::int8_weight_only_linear``), at the deployment batch (rows of the activation). Each
(shape, kernel, path, rows, threads) is timed once and kept in ``~/.cache/qgraph/latency/<machine>.json``
(``QGRAPH_LATENCY_CACHE`` overrides the folder). `measured_cost_table` turns those numbers into a `CostTable`
the drivers use like the roofline one (a sum over layers), and `roofline_error` reports how far the roofline
prior is from them.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from qgraph.search.costs import CostTable
from qgraph.search.space import Choice, SearchError, Space

LATENCY_VERSION = 2


def machine_fingerprint() -> str:
    """CPU model, core count, torch version and thread count: what the timings depend on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    sig = f"{cpu}|{os.cpu_count()}|{torch.__version__}|{torch.get_num_threads()}|v{LATENCY_VERSION}"
    return hashlib.sha256(sig.encode()).hexdigest()[:16]


def cache_path() -> Path:
    folder = Path(os.environ.get("QGRAPH_LATENCY_CACHE", "~/.cache/qgraph/latency")).expanduser()
    return folder / f"{machine_fingerprint()}.json"


def kernel_of(choice: Choice, mode: str = "exact") -> tuple[str, str]:
    """(kernel, path) a lowered Linear with this choice runs."""
    w = choice.weight
    if w is None:
        return "fp32", "F.linear"
    if w.scheme == "bcq" or w.bits <= 4:
        return "biqgemm", mode
    if w.bits == 8 and choice.act is None:
        return "int8-weight-only", "int8_weight_only_linear"
    raise SearchError(f"no measured kernel for choice {choice.label}; use the roofline cost table")


def _module(shape: tuple[int, int], choice: Choice, mode: str) -> torch.nn.Module:
    from qgraph.kernels.int8 import Int8WeightOnlyLinear
    from qgraph.kernels.linear import BCQLinear
    from qgraph.llm.modules import as_bcq
    from qgraph.passes.quantize_weights import quantize_tensor

    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 0.05
    kernel, _ = kernel_of(choice, mode)
    if kernel == "fp32":
        lin = torch.nn.Linear(shape[1], shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        return lin
    q = quantize_tensor(w, choice.weight)
    if kernel == "biqgemm":
        return BCQLinear(as_bcq(q), None, mode=mode)
    return Int8WeightOnlyLinear(q.codes.to(torch.int8), q.scale.reshape(-1), None)


def time_module(module: torch.nn.Module, x: torch.Tensor, repeats: int = 7) -> float:
    """Median µs of ``module(x)`` over ``repeats`` runs after two warm-up calls."""
    with torch.no_grad():
        module(x)
        module(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            module(x)
            times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


class LatencyTable:
    """Measured µs per (shape, kernel, path, rows), loaded from and saved to this machine's cache file."""

    def __init__(self, path: str | Path | None = None, repeats: int = 7):
        self.path = Path(path) if path is not None else cache_path()
        self.repeats = repeats
        self.threads = torch.get_num_threads()
        self.measured = 0
        try:
            self.data: dict[str, float] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def key(self, shape: tuple[int, int], choice: Choice, rows: int, mode: str) -> str:
        kernel, path = kernel_of(choice, mode)
        w = choice.weight
        detail = "" if w is None else f"|{w.scheme}{w.bits}|g{w.group_size or 0}|z{int(bool(w.bcq_offset))}"
        return f"{kernel}|{path}|{shape[0]}x{shape[1]}|rows{rows}|t{self.threads}{detail}"

    def linear_us(self, shape: tuple[int, int], choice: Choice, rows: int, mode: str = "exact") -> float:
        k = self.key(shape, choice, rows, mode)
        if k not in self.data:
            x = torch.randn(rows, shape[1])
            saved = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                self.data[k] = time_module(_module(shape, choice, mode), x, self.repeats)
            finally:
                torch.set_num_threads(saved)
            self.measured += 1
            self._save()
        return self.data[k]

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.data, indent=0, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a cache only


def measured_cost_table(space: Space, rows: int, table: LatencyTable | None = None, *, base_us: float = 0.0,
                        mode: str = "exact") -> CostTable:
    """A `CostTable` of measured µs: each Linear layer's choice at ``rows`` activation rows; Gather layers
    (table lookups) cost 0 here and other nodes are ``base_us`` (measure them once, e.g. the eager fp32 model
    minus its Linears)."""
    table = table or LatencyTable()
    per_layer = []
    for layer in space.layers:
        if layer.op == "Gather" or len(layer.shape) != 2:
            per_layer.append(tuple(0.0 for _ in layer.choices))
            continue
        shape = (int(layer.shape[0]), int(layer.shape[1]))
        per_layer.append(tuple(table.linear_us(shape, ch, rows, mode) for ch in layer.choices))
    return CostTable("measured", base_us, tuple(per_layer))


def roofline_error(roofline: CostTable, measured: CostTable) -> dict[str, Any]:
    """How the roofline prior compares with measurement over every (layer, choice) both price: Spearman rank
    correlation and the median / worst ratio predicted ÷ measured."""
    from scipy.stats import spearmanr

    pred, meas = [], []
    for rp, rm in zip(roofline.per_layer, measured.per_layer):
        for p, m in zip(rp, rm):
            if m > 0:
                pred.append(p)
                meas.append(m)
    if len(pred) < 3:
        return {"n": len(pred)}
    ratios = sorted(p / m for p, m in zip(pred, meas))
    return {"n": len(pred), "spearman": float(spearmanr(pred, meas).statistic),
            "median_ratio": statistics.median(ratios), "min_ratio": ratios[0], "max_ratio": ratios[-1]}
