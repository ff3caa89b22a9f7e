"""Strategy: text forms round-trip (JSON, TOML, per-annotation text), the hash is stable and
order-independent, and the printed pipeline is one qgraph.quantize accepts."""
from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.errors import SpecError
from qgraph.pass_manager import PassManager
from qgraph.quant.qspec import Annotation, QSpec
from qgraph.search.strategy import Strategy, annotation_from_text, annotation_to_text

weight_specs = st.one_of(
    st.builds(lambda b, g, m, off, e: QSpec.bcq(b, group_size=g, method=m, bcq_offset=off, importance_exp=e),
              st.integers(1, 4), st.sampled_from([None, 32, 64, 128]), st.sampled_from(["greedy", "alternating", "weighted"]),
              st.booleans(), st.sampled_from([0.0, 1.0, 2.5])),
    st.builds(lambda b, gran, sym, p2: QSpec.uniform(b, granularity=gran[0], group_size=gran[1], symmetric=sym,
                                                      pow2_scale=p2),
              st.integers(2, 8), st.sampled_from([("tensor", None), ("channel", None), ("group", 128)]), st.booleans(),
              st.booleans()))
act_specs = st.builds(lambda b, sym, obs, p2: QSpec.uniform(b, symmetric=sym, signed=sym, observer=obs, pow2_scale=p2),
                      st.integers(4, 8), st.booleans(), st.sampled_from(["minmax", "percentile", "mse"]), st.booleans())
annotations = st.one_of(
    st.just(Annotation(fallback_float=True)),
    st.builds(lambda w, a: Annotation(weight=w, inputs={0: a} if a is not None else {}), weight_specs,
              st.one_of(st.none(), act_specs)),
    st.builds(lambda a, o: Annotation(inputs={0: a}, output=o), act_specs, st.one_of(st.none(), act_specs)))
strategies = st.builds(lambda d, t: Strategy(d, t),
                       st.dictionaries(st.from_regex(r"[a-z][a-z0-9_.]{0,30}", fullmatch=True), annotations,
                                       min_size=1, max_size=8),
                       st.sampled_from(["x86-avx2", "npu-int8", ""]))


@settings(max_examples=60, deadline=None)
@given(annotations)
def test_annotation_text_round_trips(ann):
    assert annotation_from_text(annotation_to_text(ann)) == ann


@settings(max_examples=40, deadline=None)
@given(strategies)
def test_strategy_json_and_toml_round_trip_with_same_hash(s):
    for back in (Strategy.from_json(s.to_json()), Strategy.from_toml(s.to_toml())):
        assert back == s
        assert back.sha256 == s.sha256
        assert back.target == s.target


def test_hash_ignores_insertion_order_and_is_stable_across_processes():
    anns = {"fc2": Annotation(weight=QSpec.bcq(3, group_size=128)), "fc1": Annotation(fallback_float=True),
            "fc0": Annotation(weight=QSpec.uniform(8, granularity="channel"), inputs={0: QSpec.uniform(8)})}
    a = Strategy(anns, "x86-avx2")
    b = Strategy(dict(reversed(list(anns.items()))), "x86-avx2")
    assert a.sha256 == b.sha256 and a == b and hash(a) == hash(b)
    assert a.sha256 != Strategy(anns, "npu-int8").sha256
    code = ("from qgraph.search.strategy import Strategy; import sys; "
            "print(Strategy.from_json(sys.stdin.read()).sha256)")
    out = subprocess.run([sys.executable, "-c", code], input=a.to_json(), capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip() == a.sha256


def test_pipeline_parses_and_needs_calibration_only_with_activations():
    w_only = Strategy({"fc": Annotation(weight=QSpec.bcq(2, group_size=64))})
    w8a8 = Strategy({"fc": Annotation(weight=QSpec.uniform(8), inputs={0: QSpec.uniform(8, symmetric=False)})})
    assert "calibrate" not in w_only.pipeline() and "calibrate" in w8a8.pipeline()
    for s in (w_only, w8a8):
        assert str(PassManager(s.pipeline())) == s.pipeline()


@pytest.mark.parametrize("text", ["", "bcq9/g128/weighted", "int8/channel/sym in0", "int8/channel/sym foo=int8/tensor/sym"])
def test_bad_entries_are_spec_errors(text):
    with pytest.raises(SpecError):
        annotation_from_text(text)


def test_save_load_files(tmp_path):
    s = Strategy({"a.b": Annotation(weight=QSpec.uniform(4, granularity="group", group_size=128))}, "x86-avx2")
    for name in ("s.json", "s.toml"):
        assert Strategy.load(s.save(tmp_path / name)) == s
    with pytest.raises(SpecError, match="does not exist"):
        Strategy.load(tmp_path / "missing.toml")
