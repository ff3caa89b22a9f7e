"""gptq and aespa share one GPTQ options dataclass: the same option names, defaults and validation messages."""
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.errors import OptionError, PipelineError
from qgraph.pass_manager import PassManager
from qgraph.quant.gptq import GPTQOptions
from qgraph.registry import get_pass

GPTQ_FIELDS = [f.name for f in dataclasses.fields(GPTQOptions)]

BAD = ["block=0", "block=-3", "damp=-0.1", "p=0", "p=-2", "max_batches=0", "bcq_importance=fisher",
       "act_order=maybe", "sequential=2", "block=1.5", "nope=1"]


def test_one_definition():
    gptq_opts, aespa_opts = get_pass("gptq").Options, get_pass("aespa").Options
    assert gptq_opts is GPTQOptions and issubclass(aespa_opts, GPTQOptions)
    shared = {f.name: (f.type, f.default) for f in dataclasses.fields(aespa_opts) if f.name in GPTQ_FIELDS}
    assert shared == {f.name: (f.type, f.default) for f in dataclasses.fields(GPTQOptions)}


def _error(pipeline: str) -> str:
    with pytest.raises(PipelineError) as e:
        PassManager(pipeline)
    return str(e.value)


@pytest.mark.parametrize("bad", BAD)
def test_aespa_and_gptq_reject_the_same_bad_values_alike(bad):
    g, a = _error(f"gptq{{{bad}}}"), _error(f"aespa{{{bad}}}")
    assert g.startswith("pass 'gptq'") and a.startswith("pass 'aespa'")
    if bad.startswith("nope"):  # the list of valid options differs (aespa has its own too)
        assert "has no option 'nope'" in g and "has no option 'nope'" in a
    else:
        assert g.replace("gptq", "X") == a.replace("aespa", "X"), (g, a)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["block", "damp", "p", "max_batches"]),
       st.one_of(st.integers(-5, 300), st.floats(-2, 5, allow_nan=False)))
def test_numeric_option_ranges_agree(name, value):
    """Any value of a shared numeric option is accepted by both passes or rejected by both with one message."""
    results = []
    for pass_name in ("gptq", "aespa"):
        try:
            PassManager(f"{pass_name}{{{name}={value!r}}}")
            results.append("ok")
        except PipelineError as e:
            results.append(str(e).replace(pass_name, "X"))
    assert results[0] == results[1]


def test_aespa_options_validated_too():
    with pytest.raises(OptionError, match="pass 'aespa': option 'lr' must be > 0, got 0.0"):
        PassManager("aespa{lr=0}")
    assert PassManager("aespa{block=64,iters=3,damp=0.05}").passes[0].options.block == 64
