"""Timed, streamed greedy generation; the static-cache compiled decode step (dynamo with the eager backend, so
the test stays fast) and its eager fallback; the decode-step profile."""
import copy

import pytest
import torch

from qgraph.llm import LMRecipe, apply_weights, quantize_lm
from qgraph.llm.profile import profile_decode
from qgraph.llm.runtime import Generator
from tests.llm.conftest import tiny_tokenizer


@pytest.fixture(scope="module")
def qmodel(tiny):
    lw = quantize_lm(tiny, LMRecipe(bits=3, group_size=32, optimizer="rtn"))
    return apply_weights(copy.deepcopy(tiny), lw, mode="exact")


def test_generation_is_timed_and_streamed(qmodel):
    tok = tiny_tokenizer()
    pieces = []
    res = Generator(qmodel, tok).generate("w5 w6 w7 w8", 10, on_text=pieces.append, stop_at_eos=False)
    assert res.prompt_tokens == 4 and res.new_tokens == 10 and len(res.token_times) == 11
    assert "".join(pieces) == res.text and len(res.text.split()) <= 10
    assert res.prompt_seconds > 0 and res.decode_seconds > 0
    assert res.decode_tokens_per_s == pytest.approx(9 / res.decode_seconds)


def test_compiled_static_cache_decode_gives_the_same_tokens(qmodel, one_thread):
    ids = torch.tensor([[5, 9, 33, 7]])
    eager = Generator(qmodel, None).generate(ids, 12, stop_at_eos=False)
    g = Generator(qmodel, None, compile=True, backend="eager")
    first = g.generate(ids, 12, stop_at_eos=False)
    again = g.generate(torch.tensor([[5, 9, 33, 7, 8, 1]]), 12, stop_at_eos=False)  # same cache bucket
    assert g.compile and g.compile_seconds is not None
    assert torch.equal(first.ids, eager.ids)
    assert again.new_tokens == 12


def test_compile_failure_falls_back_to_eager_with_one_line(qmodel, capsys):
    def broken(gm, inputs):
        raise RuntimeError("no compiler here")

    ids = torch.tensor([[5, 9, 33, 7]])
    g = Generator(qmodel, None, compile=True, backend=broken)
    res = g.generate(ids, 6, stop_at_eos=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert not g.compile and "no compiler here" in g.compile_error
    assert len(err) == 1 and err[0].startswith("qgraph: torch.compile of the decode step failed")
    assert torch.equal(res.ids, Generator(qmodel, None).generate(ids, 6, stop_at_eos=False).ids)


def test_decode_profile_splits_a_step(qmodel, tiny, one_thread):
    ids = torch.tensor([[5, 9, 33, 7]])
    p = profile_decode(Generator(qmodel, None), ids, steps=6)
    parts = ("kernel", "attention", "other ops", "compiled code", "python", "sampling + loop")
    assert p["steps"] == 6 and p["kernel"] > 0 and p["attention"] > 0 and p["compiled code"] == 0
    assert p["step"] == pytest.approx(sum(p[k] for k in parts))
    float_p = profile_decode(Generator(tiny, None), ids, steps=6)  # float Linears count as kernel too
    assert float_p["kernel"] > 0


def test_compile_options_are_ones_torch_compile_accepts_and_the_cache_is_bucketed(qmodel):
    g = Generator(qmodel, None, compile=True)
    assert g.compile_options() == {"cpp.threads": 1}
    torch.compile(lambda x: x + 1, options=g.compile_options())
    first = g._static_cache(300)
    assert g._cache_len == 512 and g._static_cache(257) is first  # same bucket: the cache is reused
    assert g._static_cache(600) is not first and g._cache_len == 768


def test_compiled_loop_stops_at_eos_like_generate(qmodel):
    ids = torch.tensor([[5, 9, 33, 7]])
    ref = Generator(qmodel, None).generate(ids, 12, stop_at_eos=False).ids[0, 4:].tolist()
    eos = ref[3]  # the 4th new token plays the end of sequence
    model = copy.deepcopy(qmodel)
    model.generation_config.eos_token_id = eos
    want = Generator(model, None).generate(ids, 12).ids
    got = Generator(model, None, compile=True, backend="eager").generate(ids, 12).ids
    assert torch.equal(got, want) and got.shape[1] == 4 + ref.index(eos) + 1


def test_compiled_step_failing_at_run_time_falls_back_to_eager(qmodel, capsys):
    calls = [0]

    def flaky(gm, inputs):  # compiles, then breaks on the third decode step (after warm-up's two)
        def run(*args):
            calls[0] += 1
            if calls[0] > 2:
                raise RuntimeError("index out of bounds")
            return gm(*args)

        return run

    ids = torch.tensor([[5, 9, 33, 7]])
    g = Generator(qmodel, None, compile=True, backend=flaky)
    res = g.generate(ids, 6, stop_at_eos=False)
    assert not g.compile and "index out of bounds" in g.compile_error
    assert "running eager" in capsys.readouterr().err
    assert torch.equal(res.ids, Generator(qmodel, None).generate(ids, 6, stop_at_eos=False).ids)


def test_compiled_generator_hands_batches_to_generate(qmodel):
    ids = torch.tensor([[5, 9, 33, 7], [8, 1, 40, 2]])
    want = Generator(qmodel, None).generate(ids, 6, stop_at_eos=False).ids
    g = Generator(qmodel, None, compile=True, backend="eager")
    got = g.generate(ids, 6, stop_at_eos=False).ids
    assert got.shape == (2, 10) and torch.equal(got, want)
    assert g.compile and g.compile_error is None  # not a fallback after a failure
