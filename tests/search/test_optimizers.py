"""The weight optimizer is part of a candidate: GPTQ / aespa choices in the space, in strategies (text and
hash), scored after that optimizer ran, and its results cached on disk; tied tables count once."""
from __future__ import annotations

import pytest
import torch

from qgraph.errors import SpecError
from qgraph.search.objectives import EvalConfig, Workbench
from qgraph.search.optimized import run_optimizer
from qgraph.search.space import SearchError, SpaceOptions, build_space
from qgraph.search.strategy import Strategy
from tests.search import write_toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    spec = write_toy(tmp_path_factory.mktemp("toy"))
    bench = Workbench(EvalConfig(spec, "x86-avx2"))
    opts = SpaceOptions(uniform_bits=(8, 4), bcq_bits=(3,), act=False, optimizers=("gptq",))
    yield spec, bench, build_space(bench.graph, bench.target, opts)
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _opt_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QGRAPH_OPTIMIZED_CACHE", str(tmp_path / "optimized"))


def test_space_offers_each_spec_with_each_optimizer(toy):
    _, _, space = toy
    labels = space.labels()
    assert "gptq:bcq3-g128" in labels and "bcq3-g128" in labels and "gptq:w4-g128" in labels
    for layer in space.layers:
        opt = [ch for ch in layer.choices if ch.optimizer == "gptq"]
        assert all(ch.act is None and ch.weight is not None for ch in opt)
        assert all(ch.weight.bcq_method == "alternating" for ch in opt if ch.weight.scheme == "bcq")
        rtn_weights = [ch for ch in layer.choices if ch.optimizer == "rtn" and ch.weight is not None]
        assert len(opt) == len(rtn_weights)


def test_strategy_round_trips_its_optimizers(toy, tmp_path):
    _, _, space = toy
    a = space.uniform("gptq:bcq3-g128")
    s = space.strategy(a)
    assert set(s.optimizers.values()) == {"gptq"} and len(s.optimizers) == len(space.searchable)
    for suffix in (".json", ".toml"):
        back = Strategy.load(s.save(tmp_path / f"s{suffix}"))
        assert back == s and back.optimizers == s.optimizers
    assert space.assignment(s) == a
    plain = space.strategy(space.uniform("bcq3-g128"))
    assert plain.sha256 != s.sha256 and not plain.optimizers
    assert "opt=gptq" in s.to_json()
    with pytest.raises(SpecError, match="unknown optimizer"):
        Strategy.from_dict({"nodes": {"a": "bcq3/g128/alternating opt=adam"}})
    with pytest.raises(SearchError, match="unknown optimizer"):
        SpaceOptions(optimizers=("adam",))


def test_uniform_gptq_trial_equals_one_gptq_run_and_is_cached(toy):
    spec, bench, space = toy
    s = space.strategy(space.uniform("gptq:bcq3-g128"))
    res = bench.evaluate(s)
    spec3 = next(ch.weight for ch in space.layers[0].choices if ch.label == "gptq:bcq3-g128")
    nodes = bench.optimized_nodes("gptq", spec3)
    assert set(nodes) == {layer.node for layer in space.layers}
    direct = run_optimizer(bench.graph, bench.target, nodes, "gptq", bench.optimized.calibration)
    for name, q in direct.items():
        assert torch.equal(q.dequantize(), bench.qweight(name, spec3, "gptq").dequantize())
    rtn = bench.evaluate(space.strategy(space.uniform("bcq3-g128")))
    assert res["metric"] != rtn["metric"]  # the optimizer's weights were used
    assert res["metric"] > 0.9
    # a second process-like workbench reads the results from disk instead of running GPTQ again
    other = Workbench(EvalConfig(spec, "x86-avx2"))
    again = other.evaluate(s)
    assert other.optimized.runs == 0 and again["metric"] == pytest.approx(res["metric"], abs=1e-12)


def test_mixed_optimizers_take_each_layer_from_its_own_run(toy):
    _, bench, space = toy
    labels = ["gptq:bcq3-g128", "bcq3-g128", "gptq:w4-g128", "fp32", "w8-ch"]
    a = tuple(next(c for c, ch in enumerate(layer.choices) if ch.label == lb)
              for layer, lb in zip(space.layers, labels))
    s = space.strategy(a)
    assert s.optimizers == {space.layers[0].key: "gptq", space.layers[2].key: "gptq"}
    g = bench.apply(s)
    assert g is not None
    w0 = next(ch.weight for ch in space.layers[0].choices if ch.label == "gptq:bcq3-g128")
    assert not torch.equal(bench.qweight(space.layers[0].node, w0, "gptq").dequantize(),
                           bench.qweight(space.layers[0].node, w0.replace(bcq_method="weighted")).dequantize())


TIED = '''
import torch
import torch.nn as nn


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(512, 64)
        self.mid = nn.Linear(64, 64)
        self.head = nn.Linear(64, 512, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.emb(ids))))


def make():
    torch.manual_seed(0)
    return TinyLM().eval(), (torch.randint(0, 512, (4, 16)),)
'''


def test_tied_table_is_one_choice_stored_once(tmp_path):
    path = tmp_path / "tied.py"
    path.write_text(TIED)
    bench = Workbench(EvalConfig(f"{path}:make", "x86-avx2"))
    space = build_space(bench.graph, bench.target, SpaceOptions(act=False, embeddings=True, bcq_bits=(3,),
                                                                uniform_bits=(8, 4)))
    emb = next(i for i, layer in enumerate(space.layers) if layer.op == "Gather")
    followers = [i for i, layer in enumerate(space.layers) if layer.follows is not None]
    assert len(followers) == 1
    head = followers[0]
    assert space.layers[head].follows == emb and not space.layers[head].searchable
    a = list(space.high())
    a[emb] = next(c for c, ch in enumerate(space.layers[emb].choices) if ch.label == "w8-ch")
    s = space.strategy(a)
    assert s.annotations[space.layers[head].key] == s.annotations[space.layers[emb].key]
    assert space.float_bytes() == space.weight_bytes(space.high()) == (512 * 64 + 64 * 64) * 4
    assert space.weight_bytes(a) == space.float_bytes() - 512 * 64 * 4 + space.layers[emb].bytes_of(a[emb])


def test_optimizers_can_be_limited_to_one_label(toy):
    _, bench, _ = toy
    space = build_space(bench.graph, bench.target, SpaceOptions(uniform_bits=(8, 4), bcq_bits=(3,), act=False,
                                                                optimizers=("aespa:bcq3-g128",)))
    opt = {ch.label for layer in space.layers for ch in layer.choices if ch.optimizer != "rtn"}
    assert opt == {"aespa:bcq3-g128"}


def test_stored_bytes_and_front_report(toy, tmp_path):
    from qgraph.search.evidence import stored_bytes_rest, write_front_report

    _, bench, space = toy
    params = {id(t): t for t in list(bench.graph.gm.parameters()) + list(bench.graph.gm.buffers())}
    total = sum(t.numel() * t.element_size() for t in params.values())
    rest = stored_bytes_rest(bench.graph, space)
    assert rest + space.float_bytes() == total
    assert rest == sum(m.bias.numel() * 4 for m in (bench.source.module.a, bench.source.module.q,
                                                   bench.source.module.k, bench.source.module.o,
                                                   bench.source.module.head))
    pts = [{"name": "uniform bcq3", "kind": "baseline", "metric": 0.9, "bytes": 1e5,
            "strategy": space.strategy(space.uniform("bcq3-g128"))},
           {"name": "front 0", "kind": "front", "metric": 0.95, "bytes": 9e4,
            "strategy": space.strategy(space.uniform("gptq:bcq3-g128"))}]
    md = write_front_report(pts, tmp_path / "rep", title="toy", metric="cosine")
    text = md.read_text()
    assert "(strategies/01-front-0.json)" in text and (tmp_path / "rep" / "pareto.png").stat().st_size > 1000
    back = Strategy.load(tmp_path / "rep" / "strategies" / "01-front-0.json")
    assert back == pts[1]["strategy"]


def test_reported_strategy_lowered_saved_and_reloaded_reproduces_its_score(toy, tmp_path):
    """The search's score of a strategy is what the user gets: quantize with it, lower to the kernels, save,
    load, and score the reloaded model the same way (cosine of output rows to fp32)."""
    import qgraph
    from qgraph.api import LOWERING_PASSES
    from qgraph.artifact import load_artifact, save_artifact
    from qgraph.model_source import load_model_source
    from qgraph.search.metrics import cosine_rows

    spec, bench, space = toy
    labels = ["bcq3-g128", "w4-g128", "fp32", "bcq3-g128", "w8-ch"]
    a = tuple(next(c for c, ch in enumerate(layer.choices) if ch.label == lb)
              for layer, lb in zip(space.layers, labels))
    s = space.strategy(a)
    score = bench.evaluate(s)["metric"]
    src = load_model_source(spec)
    pipeline = s.pipeline() + "," + ",".join(LOWERING_PASSES) + ",dce"
    low = qgraph.quantize(src.module, src.example_inputs, target="x86-avx2", calib=bench.data.calib_batches,
                          pipeline=pipeline, strategy=s.config(), progress=False)
    again = load_artifact(save_artifact(low, tmp_path / "art"))
    with torch.no_grad():
        outs = [again(*b) for b in bench.data.eval_batches]
    got = float(torch.cat([cosine_rows(o, r) for o, r in zip(outs, bench.reference)]).mean())
    assert got == pytest.approx(score, abs=2e-4)
