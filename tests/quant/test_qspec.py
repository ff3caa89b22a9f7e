import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.errors import SpecError
from qgraph.quant.qspec import OBSERVER_NAMES, Annotation, QSpec


@st.composite
def qspecs(draw):
    scheme = draw(st.sampled_from(["uniform", "bcq"]))
    if scheme == "uniform":
        gran = draw(st.sampled_from(["tensor", "channel", "group"]))
        return QSpec(
            scheme="uniform",
            bits=draw(st.integers(2, 8)),
            signed=draw(st.booleans()),
            symmetric=draw(st.booleans()),
            granularity=gran,
            axis=draw(st.integers(-2, 3)),
            group_size=draw(st.sampled_from([8, 32, 128])) if gran == "group" else None,
            pow2_scale=draw(st.booleans()),
            observer=draw(st.sampled_from(OBSERVER_NAMES)),
        )
    gran = draw(st.sampled_from(["channel", "group"]))
    return QSpec(
        scheme="bcq",
        bits=draw(st.integers(1, 8)),
        granularity=gran,
        group_size=draw(st.sampled_from([16, 64, 128])) if gran == "group" else None,
        bcq_method=draw(st.sampled_from(["greedy", "alternating", "weighted"])),
        bcq_rounds=draw(st.integers(0, 30)),
        importance_exp=draw(st.floats(0, 4, allow_nan=False)),
        importance_clip_quantile=draw(st.none() | st.floats(0.01, 1.0)),
        bcq_offset=draw(st.booleans()),
    )


def test_defaults_and_short_strings():
    assert str(QSpec()) == "int8/tensor/sym"
    assert str(QSpec.uniform(8, granularity="channel")) == "int8/channel/sym"
    assert str(QSpec.uniform(4, symmetric=False, signed=False, granularity="group", group_size=64)) == (
        "uint4/g64/asym"
    )
    assert str(QSpec.bcq(3, 128)) == "bcq3/g128/weighted"
    assert str(QSpec.bcq(2, method="greedy", bcq_offset=True)) == "bcq2/channel/greedy/offset"
    assert str(QSpec(pow2_scale=True, observer="percentile")) == "int8/tensor/sym/pow2/obs=percentile"
    s = QSpec()
    assert (s.qmin, s.qmax) == (-128, 127)
    u = QSpec(bits=4, signed=False)
    assert (u.qmin, u.qmax) == (0, 15)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"bits": 1}, "2..8"),
        ({"bits": 9}, "2..8"),
        ({"bits": 16}, "2..8"),
        ({"bits": True}, "int"),
        ({"bits": 8.0}, "int"),
        ({"scheme": "fp8"}, "uniform"),
        ({"granularity": "row"}, "tensor"),
        ({"granularity": "group"}, "group_size"),
        ({"granularity": "group", "group_size": 0}, "positive"),
        ({"granularity": "channel", "group_size": 32}, "only applies"),
        ({"observer": "kl"}, "minmax"),
        ({"signed": 1}, "bool"),
        ({"bcq_offset": True}, "bcq"),
        ({"bcq_method": "greedy"}, "only applies to scheme='bcq'"),
        ({"importance_exp": 2.0}, "only applies to scheme='bcq'"),
        ({"scheme": "bcq", "bits": 3, "granularity": "channel", "symmetric": False}, "bcq_offset=True"),
        ({"scheme": "bcq", "bits": 3, "granularity": "channel", "signed": False}, "bcq_offset=True"),
        ({"scheme": "bcq", "bits": 0, "granularity": "channel"}, "1..8"),
        ({"scheme": "bcq", "bits": 9, "granularity": "channel"}, "1..8"),
        ({"scheme": "bcq", "bits": 3}, "per row"),
        ({"scheme": "bcq", "bits": 3, "granularity": "channel", "pow2_scale": True}, "pow2"),
        ({"scheme": "bcq", "bits": 3, "granularity": "channel", "axis": 1}, "axis"),
        ({"scheme": "bcq", "bits": 3, "granularity": "channel", "bcq_method": "lsq"}, "greedy"),
        ({"scheme": "bcq", "bits": 3, "granularity": "channel", "bcq_rounds": -1}, ">= 0"),
        ({"scheme": "bcq", "bits": 3, "granularity": "channel", "importance_exp": -1.0}, ">= 0"),
        ({"scheme": "bcq", "bits": 3, "granularity": "channel", "importance_clip_quantile": 0.0}, "(0, 1]"),
        ({"scheme": "bcq", "bits": 3, "granularity": "channel", "importance_clip_quantile": 1.5}, "(0, 1]"),
    ],
)
def test_invalid_specs_say_what_is_allowed(kwargs, needle):
    with pytest.raises(SpecError) as e:
        QSpec(**kwargs)
    assert needle in str(e.value)


def test_frozen_and_replace_revalidates():
    s = QSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.bits = 4  # type: ignore[misc]
    assert s.replace(bits=4).bits == 4
    with pytest.raises(SpecError):
        s.replace(bits=12)


def test_check_tensor():
    QSpec.uniform(4, granularity="group", group_size=32).check_tensor((16, 64))
    QSpec.uniform(4, granularity="group", group_size=36).check_tensor((8, 4, 3, 3))  # K = 4*3*3
    with pytest.raises(SpecError, match="does not divide the row length 64"):
        QSpec.uniform(4, granularity="group", group_size=48).check_tensor((16, 64))
    with pytest.raises(SpecError, match="out of range"):
        QSpec.uniform(8, granularity="channel", axis=2).check_tensor((16, 64))
    QSpec.uniform(8, granularity="channel", axis=-1).check_tensor((16, 64))
    with pytest.raises(SpecError, match="matrix"):
        QSpec.bcq(3).check_tensor((64,))
    with pytest.raises(SpecError, match="divide"):
        QSpec.bcq(3, 100).check_tensor((4, 128))
    QSpec().check_tensor(())


@settings(max_examples=60, deadline=None)
@given(qspecs())
def test_dict_json_and_text_round_trip(spec):
    d = json.loads(json.dumps(spec.to_dict()))
    assert QSpec.from_dict(d) == spec
    assert QSpec.parse(str(spec)) == spec


def test_from_dict_and_parse_errors():
    with pytest.raises(SpecError, match="unknown QSpec field"):
        QSpec.from_dict({"bits": 8, "nbits": 8})
    assert QSpec.from_dict({"bits": 4}) == QSpec(bits=4)
    for bad in ["int8", "fp8/tensor/sym", "int8/tensor/maybe", "int8/tensor/sym/foo", "int8/tensor/sym/axis=x"]:
        with pytest.raises(SpecError, match="cannot parse"):
            QSpec.parse(bad)


def test_annotation_round_trip_and_access():
    a = Annotation(
        inputs={0: QSpec(symmetric=False, signed=False), 2: QSpec(observer="entropy")},
        weight=QSpec.bcq(3, 128),
        output=QSpec(),
    )
    b = Annotation.from_dict(json.loads(json.dumps(a.to_dict())))
    assert b == a
    assert b.get(2).observer == "entropy" and b.get(1) is None
    assert b.get("weight") == QSpec.bcq(3, 128) and b.get("output") == QSpec()
    assert a.is_quantized and not Annotation(fallback_float=True).is_quantized
    assert Annotation.META_KEY == "qgraph.annotation"
    with pytest.raises(SpecError):
        a.get("bias")


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"fallback_float": True, "output": QSpec()}, "float"),
        ({"output": QSpec.bcq(3)}, "weight-only"),
        ({"inputs": {0: QSpec.bcq(3)}}, "weight-only"),
        ({"inputs": {-1: QSpec()}}, "indices"),
        ({"inputs": {"x": QSpec()}}, "indices"),
        ({"weight": "int8"}, "QSpec"),
    ],
)
def test_annotation_rejects(kwargs, needle):
    with pytest.raises(SpecError) as e:
        Annotation(**kwargs)
    assert needle in str(e.value)


def test_annotation_from_dict_errors():
    with pytest.raises(SpecError, match="unknown Annotation field"):
        Annotation.from_dict({"outputs": None})
    with pytest.raises(SpecError, match="integer"):
        Annotation.from_dict({"inputs": {"a": QSpec().to_dict()}})
