"""Trial cache (JSON lines, torn-line tolerant, side files) and runners: inline, spawn pool, Ray."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from qgraph.quant.qspec import Annotation, QSpec
from qgraph.search.objectives import EvalConfig, Workbench
from qgraph.search.space import build_space
from qgraph.search.strategy import Strategy
from qgraph.search.trials import TrialCache, TrialRunner, trial_key
from tests.search import write_toy


def _s(bits: int) -> Strategy:
    return Strategy({"fc": Annotation(weight=QSpec.bcq(bits, group_size=128))}, "x86-avx2")


def test_cache_appends_reloads_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "c.jsonl"
    c = TrialCache(path)
    c.put("k1", {"result": {"metric": 0.5}})
    c.put("k2", {"result": {"metric": 0.25}})
    with open(path, "a") as f:
        f.write('{"key": "k3", "result": {"met')  # a write cut short by a kill
    again = TrialCache(path)
    assert set(again.records) == {"k1", "k2"} and again.skipped_lines == 1
    again.put("k4", {"result": {"metric": 1.0}})
    final = TrialCache(path)
    assert set(final.records) == {"k1", "k2", "k4"} and final.get("k4")["result"]["metric"] == 1.0
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1])["key"] == "k4"


def test_an_edited_line_is_ignored_and_its_trial_recomputed(tmp_path):
    path = tmp_path / "c.jsonl"
    cfg = EvalConfig("unused", "x86-avx2")
    bench = _FakeBench()
    TrialRunner(cfg, cache=TrialCache(path), workers=0, bench=bench).run([_s(2), _s(3)])
    honest = {json.loads(ln)["key"]: json.loads(ln) for ln in path.read_text().splitlines()}
    forged = []
    for rec in honest.values():  # a forged result: the worst strategy claims a perfect metric
        rec = json.loads(json.dumps(rec))
        if rec["result"]["metric"] < 0.96:
            rec["result"]["metric"] = 1.0
        forged.append(json.dumps(rec, sort_keys=True))
    path.write_text("\n".join(forged) + "\n")
    cache = TrialCache(path)
    assert cache.skipped_lines == 1 and len(cache) == 1
    bench2 = _FakeBench()
    out = TrialRunner(cfg, cache=cache, workers=0, bench=bench2).run([_s(2), _s(3)])
    assert bench2.calls == [_s(2).sha256]  # recomputed, not served from the forged line
    assert [round(r["metric"], 6) for r in out] == [round(1 - 0.1 / 2, 6), round(1 - 0.1 / 3, 6)]


def test_side_files_are_keyed_by_fingerprint(tmp_path):
    c = TrialCache(tmp_path / "c.jsonl")
    c.save_side("sens", "fp1", {"a": [1, 2]})
    assert c.load_side("sens", "fp1") == {"a": [1, 2]}
    assert c.load_side("sens", "other") is None
    assert TrialCache(None).load_side("sens", "fp1") is None


class _FakeBench:
    def __init__(self):
        self.calls = []

    def evaluate(self, s):
        self.calls.append(s.sha256)
        bits = s.annotations["fc"].weight.bits
        return {"metric": 1 - 0.1 / bits, "drop": 0.1 / bits}


def test_runner_dedups_and_serves_the_cache(tmp_path):
    cfg = EvalConfig("unused", "x86-avx2")
    bench = _FakeBench()
    r = TrialRunner(cfg, cache=TrialCache(tmp_path / "c.jsonl"), workers=0, bench=bench)
    out = r.run([_s(2), _s(2), _s(3)])
    assert [o["metric"] for o in out] == [0.95, 0.95, 1 - 0.1 / 3]
    assert r.evaluated == 2 and len(bench.calls) == 2
    r2 = TrialRunner(cfg, cache=TrialCache(tmp_path / "c.jsonl"), workers=0, bench=_FakeBench())
    assert r2.run([_s(3), _s(2)]) == [out[2], out[0]]
    assert r2.evaluated == 0 and r2.cached == 2
    assert trial_key(_s(2), cfg.fingerprint()) != trial_key(_s(2), EvalConfig("unused", "npu-int8").fingerprint())


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    spec = write_toy(tmp_path_factory.mktemp("toy"))
    torch.set_num_threads(1)
    bench = Workbench(EvalConfig(spec, "x86-avx2"))
    space = build_space(bench.graph, bench.target)
    strategies = [space.strategy(space.uniform(lb)) for lb in ("bcq2-g128", "w4-g128", next(x for x in space.labels() if x.startswith("w8-ch+a")))]
    return spec, bench, strategies


def test_process_pool_matches_inline(toy, tmp_path):
    spec, bench, strategies = toy
    inline = [bench.evaluate(s)["metric"] for s in strategies]
    with TrialRunner(EvalConfig(spec, "x86-avx2"), cache=TrialCache(tmp_path / "p.jsonl"), workers=2) as r:
        pooled = [x["metric"] for x in r.run(strategies)]
    assert pooled == pytest.approx(inline, abs=1e-12)
    assert len(TrialCache(tmp_path / "p.jsonl")) == 3


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed")
def test_ray_local_matches_inline(toy, tmp_path):
    import ray

    spec, bench, strategies = toy
    inline = [bench.evaluate(s)["metric"] for s in strategies[:2]]
    try:
        with TrialRunner(EvalConfig(spec, "x86-avx2"), cache=TrialCache(tmp_path / "r.jsonl"), workers=1,
                         ray_address="local") as r:
            got = [x["metric"] for x in r.run(strategies[:2])]
    finally:
        ray.shutdown()
    assert got == pytest.approx(inline, abs=1e-12)
