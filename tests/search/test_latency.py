"""Measured kernel latency: one timing per (shape, kernel, path, rows), cached per machine; a measured cost
table prices every (layer, choice) of a space; the roofline prior's error against it."""
from __future__ import annotations

import json

import pytest
import torch

from qgraph.quant.qspec import QSpec
from qgraph.search.latency import (
    LatencyTable,
    kernel_of,
    machine_fingerprint,
    measured_cost_table,
    roofline_error,
)
from qgraph.search.objectives import EvalConfig, Workbench, cost_table
from qgraph.search.space import Choice, SearchError, SpaceOptions, build_space
from tests.search import write_toy


def test_kernels_of_choices():
    assert kernel_of(Choice()) == ("fp32", "F.linear")
    assert kernel_of(Choice(QSpec.bcq(3, group_size=64)), "fast") == ("biqgemm", "fast")
    assert kernel_of(Choice(QSpec.uniform(3, granularity="group", group_size=64))) == ("biqgemm", "exact")
    assert kernel_of(Choice(QSpec.uniform(8, granularity="channel")))[0] == "int8-weight-only"
    with pytest.raises(SearchError, match="roofline"):
        kernel_of(Choice(QSpec.uniform(8, granularity="channel"), QSpec.uniform(8)))
    assert len(machine_fingerprint()) == 16


def test_measured_table_is_cached_per_machine_and_prices_the_space(tmp_path):
    torch.set_num_threads(1)
    bench = Workbench(EvalConfig(write_toy(tmp_path), "x86-avx2"))
    space = build_space(bench.graph, bench.target, SpaceOptions(uniform_bits=(8, 4), bcq_bits=(3,), act=False))
    path = tmp_path / "lat.json"
    table = LatencyTable(path, repeats=3)
    costs = measured_cost_table(space, rows=4, table=table, base_us=10.0)
    shapes = {(layer.shape, ch.label) for layer in space.layers for ch in layer.choices}
    keys = json.loads(path.read_text())
    assert table.measured == len(keys), (table.measured, sorted(keys))
    assert len(keys) == len(shapes), sorted(keys)
    assert all(v > 0 for row in costs.per_layer for v in row)
    assert costs.predict(space.high()) == pytest.approx(10.0 + sum(r[space.float_index(layer)] for r, layer
                                                                    in zip(costs.per_layer, space.layers)))
    again = LatencyTable(path)
    costs2 = measured_cost_table(space, rows=4, table=again, base_us=10.0)
    assert again.measured == 0 and costs2 == costs  # read back, nothing timed twice
    err = roofline_error(cost_table(bench.graph, space, bench.target), costs)
    assert err["n"] == sum(len(layer.choices) for layer in space.layers) and -1.0 <= err["spearman"] <= 1.0 and err["max_ratio"] >= err["min_ratio"] > 0


def test_search_with_measured_latency_limit(tmp_path, monkeypatch):
    """``latency="measured"``: the limit and the latency axis are this machine's kernel timings; every feasible
    trial meets the limit, and the summary reports the roofline's error against the measurement."""
    from qgraph.search.constraints import Constraints
    from qgraph.search.run import SearchOptions, run_search

    monkeypatch.setenv("QGRAPH_LATENCY_CACHE", str(tmp_path / "lat"))
    torch.set_num_threads(1)
    spec = write_toy(tmp_path)
    space_opts = SpaceOptions(uniform_bits=(8, 4), bcq_bits=(3,), act=False)
    base = SearchOptions(model=spec, target="x86-avx2", driver="greedy", trials=4, workers=0, space=space_opts,
                         n_eval=1, baselines=(), anchor=False, sensitivity="proxy", latency="measured",
                         latency_rows=64)
    first = run_search(base)
    assert first.costs.target == "measured" and first.summary()["latency"]["rows"] == 64
    assert "spearman" in first.summary()["latency"]["roofline_vs_measured"]
    sp = first.space
    lats = sorted(first.costs.predict(sp.uniform(lb)) for lb in sp.labels())
    limit = 2.0 * lats[0]  # generous: the model's eager remainder is timed again (noisy on a loaded host)
    r = run_search(SearchOptions(**{**base.__dict__, "constraints": Constraints(max_latency_us=limit)}))
    assert r.summary()["latency"]["measured_now"] == 0  # every kernel timing read back from the machine's cache
    feasible = [t for t in r.trials if t.feasible]
    assert feasible and all(t.analytic.latency_us <= limit * (1 + 1e-9) for t in feasible)
