"""Textual pipelines: parse ↔ print round trips and typed errors."""
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph import Pass, PassResult, PipelineError, parse_pipeline, register_pass, registered_passes
from qgraph.pass_base import option_fields
from qgraph.pipeline import format_pipeline, parse_pipeline_items


@register_pass("test-all-option-types", replace=True)
class AllOptionTypes(Pass):
    @dataclass(frozen=True)
    class Options:
        bits: int = 8
        p: float = 99.9
        enabled: bool = True
        method: Literal["minmax", "percentile", "mse"] = "minmax"
        skip: tuple[str, ...] = ()
        label: str = "x"
        limit: int | None = None

    def run(self, graph, ctx):
        return PassResult(graph, modified=False)


_text = st.text(alphabet=st.characters(codec="ascii", exclude_categories=("Cc",)), min_size=0, max_size=8)


def _value_strategy(tp):
    origin = typing.get_origin(tp)
    if origin is Literal:
        return st.sampled_from(typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return st.one_of(st.none(), *[_value_strategy(a) for a in inner])
    if origin is tuple:
        return st.lists(_value_strategy(typing.get_args(tp)[0]), max_size=3).map(tuple)
    return {
        int: st.integers(-(2**40), 2**40),
        float: st.floats(allow_nan=False, allow_infinity=False),
        bool: st.booleans(),
        str: _text,
    }[tp]


# options whose values have a form their Options checks (validated in __post_init__)
_OP_NAME = st.text(alphabet=st.characters(codec="ascii", categories=("Lu", "Ll")), min_size=1, max_size=6)
_OPTION_VALUES = {("fuse-activation", "patterns"): st.lists(st.tuples(_OP_NAME, _OP_NAME).map("+".join),
                                                            max_size=3).map(tuple)}


@st.composite
def pipelines(draw):
    classes = [c for name, c in registered_passes().items() if name.startswith(("test-all", "fold", "dce", "fuse"))]
    chosen = draw(st.lists(st.sampled_from(classes), min_size=1, max_size=5))
    passes = []
    for cls in chosen:
        fields = option_fields(cls.Options)
        names = draw(st.lists(st.sampled_from(sorted(fields)), unique=True)) if fields else []
        kwargs = {n: draw(_OPTION_VALUES.get((cls.name, n), _value_strategy(fields[n][0]))) for n in names}
        passes.append(cls(**kwargs))
    return passes


@settings(max_examples=150, deadline=None)
@given(pipelines())
def test_pipeline_text_round_trips(passes):
    text = format_pipeline(passes)
    parsed = parse_pipeline(text)
    assert format_pipeline(parsed) == text
    assert [type(p) for p in parsed] == [type(p) for p in passes]
    for a, b in zip(parsed, passes):
        assert a.options == b.options


def test_parse_documented_example():
    text = "fold-bn,fuse-activation{patterns=[Conv+Relu,Gemm+Gelu]},test-all-option-types{bits=3,method=percentile,p=99.9}"
    passes = parse_pipeline(text)
    assert format_pipeline(passes) == text
    assert passes[1].options.patterns == ("Conv+Relu", "Gemm+Gelu")
    assert passes[2].options.bits == 3 and passes[2].options.p == 99.9


def test_hand_written_text_prints_back_identically():
    text = 'test-all-option-types{p=99.90,skip=["a,b",c],label="none",limit=none}'
    passes = parse_pipeline(text)
    assert format_pipeline(passes) == text
    o = passes[0].options
    assert o.skip == ("a,b", "c") and o.label == "none" and o.limit is None and o.p == 99.9


def test_unknown_pass_lists_valid_ones():
    with pytest.raises(PipelineError) as e:
        parse_pipeline("fold-bn,fold-nb")
    assert "did you mean 'fold-bn'" in str(e.value) and "dce" in str(e.value)


def test_unknown_option_lists_valid_options():
    with pytest.raises(PipelineError, match=r"no option 'bitz'.*bits: int=8"):
        parse_pipeline("test-all-option-types{bitz=3}")


@pytest.mark.parametrize(
    "text, message",
    [
        ("test-all-option-types{bits=three}", "expected an integer"),
        ("test-all-option-types{enabled=maybe}", "expected a boolean"),
        ("test-all-option-types{method=kl}", "expected one of minmax, percentile, mse"),
        ("test-all-option-types{p=high}", "expected a number"),
    ],
)
def test_bad_option_type(text, message):
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(text)


@pytest.mark.parametrize("text", ["fold-bn,", "fold-bn{", "dce{a=}", "dce{=1}", 'dce{a="x}', "Fold-BN", "dce{a=1,a=2}"])
def test_syntax_errors_point_at_the_column(text):
    with pytest.raises(PipelineError, match="bad pipeline text"):
        parse_pipeline_items(text)


def test_empty_pipeline_is_empty():
    assert parse_pipeline("") == []


def test_options_are_frozen_dataclasses():
    p = parse_pipeline("test-all-option-types{bits=4}")[0]
    assert dataclasses.is_dataclass(p.options)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.options.bits = 2
