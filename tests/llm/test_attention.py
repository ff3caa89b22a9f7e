"""The Hugging Face attention switch onto ``qgraph::decode_attention``: same logits and tokens as SDPA."""
import copy

import torch

from qgraph.llm.attention import NAME, use_decode_attention
from qgraph.llm.runtime import Generator
from tests.llm.conftest import tiny_llama


def test_switched_model_matches_sdpa_step_by_step(tiny):
    ref = tiny
    model = copy.deepcopy(tiny)
    assert use_decode_attention(model) and model.config._attn_implementation == NAME
    ids = torch.tensor([[5, 9, 33, 7, 100, 4]])
    with torch.no_grad():
        a, b = model(ids, use_cache=True), ref(ids, use_cache=True)
        for t in (3, 17, 250):
            step = torch.tensor([[t]])
            a = model(step, past_key_values=a.past_key_values, use_cache=True)
            b = ref(step, past_key_values=b.past_key_values, use_cache=True)
            assert (a.logits - b.logits).abs().max() <= 1e-5 * b.logits.abs().max()


def test_generator_switches_and_keeps_the_tokens(tiny):
    ids = torch.tensor([[5, 9, 33, 7]])
    plain = Generator(copy.deepcopy(tiny), None, decode_attention=False)
    switched = Generator(copy.deepcopy(tiny), None)
    assert not plain.decode_attention and switched.decode_attention
    assert torch.equal(plain.generate(ids, 16, stop_at_eos=False).ids,
                       switched.generate(ids, 16, stop_at_eos=False).ids)
    static = Generator(copy.deepcopy(tiny), None, compile=True, backend="eager")
    assert torch.equal(static.generate(ids, 16, stop_at_eos=False).ids,
                       plain.generate(ids, 16, stop_at_eos=False).ids)


def test_models_on_other_attention_are_left_alone():
    eager = tiny_llama()
    eager.set_attn_implementation("eager")
    assert not use_decode_attention(eager) and eager.config._attn_implementation == "eager"


def test_compiled_decode_step_of_a_float_model_has_no_graph_break(tiny):
    """The op's first use must not load the native shim inside the traced step (a lock there split the graph
    per layer, and Inductor's split graphs then indexed the static cache out of bounds)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    g = Generator(copy.deepcopy(tiny), None, compile=True, backend="eager")
    res = g.generate(torch.tensor([[5, 9, 33, 7]]), 8, stop_at_eos=False)
    assert g.compile and res.new_tokens == 8
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
