"""The native decode step (`qgraph.llm.native_decode`): logits equal to Hugging Face's one-token forward over the
same static cache, greedy text equal to ``generate()``, the models it refuses (with the reason), and the plan's
own checks."""
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qgraph.errors import KernelError
from qgraph.kernels import native
from qgraph.llm import LMRecipe, apply_weights, fuse_shared_inputs, quantize_lm
from qgraph.llm.native_decode import NativeDecoder, plan_for
from qgraph.llm.runtime import Generator
from tests.llm.conftest import tiny_llama

pytestmark = pytest.mark.skipif(not native.load(), reason="the native torch shim could not be built here")
transformers = pytest.importorskip("transformers")
REL = 2e-5  # max |Δ| / max |logit| over the vocabulary: fp32 sums in another order


def _quantized(model, bits=3, group_size=32, fuse=True, head_bits=None, scale_bits=None):
    scheme = "uniform" if scale_bits else "bcq"
    lw = quantize_lm(model, LMRecipe(scheme=scheme, bits=bits, group_size=group_size, optimizer="rtn",
                                     head_bits=head_bits, head_group_size=group_size, scale_bits=scale_bits))
    q = apply_weights(copy.deepcopy(model), lw, mode="exact")
    if fuse:
        fuse_shared_inputs(q)
    return q


def _worst_step_error(model, prompt, steps=6):
    """Max relative logits error of the native step against Hugging Face's one-token forward, over ``steps``
    tokens after ``prompt`` (each on its own static cache, greedy from Hugging Face's logits)."""
    nd = plan_for(model)
    assert isinstance(nd, NativeDecoder), nd
    n = prompt.shape[1]
    with torch.no_grad():
        caches = [transformers.StaticCache(config=model.config, max_cache_len=64) for _ in range(2)]
        for c in caches:
            out = model(input_ids=prompt, cache_position=torch.arange(n), cache=c, use_cache=True).logits
        nd.bind(caches[0])
        t, worst = int(out[0, -1].argmax()), 0.0
        for i in range(steps):
            ref = model(input_ids=torch.tensor([[t]]), cache_position=torch.tensor([n + i]), cache=caches[1],
                        use_cache=True).logits[0, -1]
            got = nd.logits(t, n + i)
            worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
            t = int(ref.argmax())
    return worst


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """Intra-op threads for the test (the native step splits each Linear's row tiles between its team)."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_native_logits_match_hugging_face(fuse, tied, threads):
    model = _quantized(tiny_llama(tied=tied), fuse=fuse)
    assert _worst_step_error(model, torch.tensor([[5, 9, 33, 7]])) < REL


@pytest.mark.parametrize("tied", [True, False])
def test_native_logits_match_with_block_scales(tied, threads):
    """cpu-lut4k Linears (fused q/k/v and gate/up) and a block-scaled tied table."""
    model = _quantized(tiny_llama(tied=tied), bits=4, scale_bits=6)
    assert model.lm_head.layout == "cpu-lut4k"
    assert _worst_step_error(model, torch.tensor([[5, 9, 33, 7]])) < REL


def test_float_model_and_a_one_token_prompt(tiny, threads):
    # float Linears and the float embedding; position 0 is a one-entry cache
    assert _worst_step_error(tiny, torch.tensor([[17]])) < REL


def test_qwen2_layout_with_q_k_v_biases(one_thread):
    torch.manual_seed(3)
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   initializer_range=0.1, tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # the init leaves them zero: make them count
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert _worst_step_error(model, torch.tensor([[5, 9, 33]])) < REL
    assert _worst_step_error(_quantized(model), torch.tensor([[5, 9, 33]])) < REL


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(heads=st.sampled_from([(4, 1), (4, 2), (4, 4), (8, 2)]), head_dim=st.sampled_from([16, 32]),
       bits=st.integers(2, 4), group=st.sampled_from([16, 32]), seed=st.integers(0, 100))
def test_native_logits_match_for_other_shapes(heads, head_dim, bits, group, seed):
    torch.manual_seed(seed)
    h, kvh = heads
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=h * head_dim, intermediate_size=3 * 32,
                                   num_hidden_layers=2, num_attention_heads=h, num_key_value_heads=kvh,
                                   max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=True)
    model = _quantized(transformers.LlamaForCausalLM(cfg).eval(), bits=bits, group_size=group)
    prompt = torch.randint(3, 96, (1, 1 + seed % 20))
    assert _worst_step_error(model, prompt, steps=4) < REL


def test_native_generation_equals_generate(tiny, prompts, one_thread):
    model = _quantized(tiny)
    eager, nat = Generator(model, None), Generator(model, None, engine="native")
    assert nat.engine == "native" and nat.native is not None
    for p in prompts:
        for stop in (True, False):  # a fixed-length run never picks an end token, as generate(min_new_tokens=)
            a, b = eager.generate(p, 16, stop_at_eos=stop), nat.generate(p, 16, stop_at_eos=stop)
            assert torch.equal(a.ids, b.ids)
            assert b.decode_tokens_per_s > 0


def test_models_it_cannot_run_say_why(tiny):
    gelu = copy.deepcopy(tiny)
    gelu.config.hidden_act = "gelu"
    assert "hidden_act" in plan_for(gelu)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert "model_type 'gpt2'" in plan_for(gpt2)
    with pytest.raises(KernelError, match="cannot run the native decode step: model_type 'gpt2'"):
        Generator(gpt2, None, engine="native")
    auto = Generator(gpt2, None, engine="auto")
    assert auto.engine == "eager" and "gpt2" in auto.native_error
    with pytest.raises(KernelError, match="engine must be one of"):
        Generator(tiny, None, engine="fastest")


def test_the_plan_checks_positions_tokens_and_caches(tiny):
    model = _quantized(tiny)
    nd = plan_for(model)
    with pytest.raises(KernelError, match="after the prompt ran"):
        nd.bind(transformers.StaticCache(config=model.config, max_cache_len=16))
    cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6]]), cache_position=torch.arange(2), cache=cache, use_cache=True)
    nd.bind(cache)
    with pytest.raises(KernelError, match="DecodePlan: position 16 past the"):
        nd.step(5, 16)
    with pytest.raises(KernelError, match="DecodePlan: token id 256 out of range"):
        nd.step(256, 2)
    nd.plan.reset_timings()
    nd.step(5, 2)
    nd.step(7, 3)
    kernel, attention, other, argmax, steps = nd.plan.timings()
    assert steps == 2 and kernel > 0 and attention > 0 and argmax > 0


def test_profile_of_a_native_step_splits_its_time(tiny, one_thread):
    from qgraph.llm.profile import profile_decode

    p = profile_decode(Generator(_quantized(tiny), None, engine="native"), torch.tensor([[5, 9, 33]]), steps=6)
    assert p["steps"] == 6 and p["kernel"] > 0 and p["attention"] > 0 and p["compiled code"] == 0
    parts = ("kernel", "attention", "other ops", "compiled code", "python", "sampling + loop")
    assert p["step"] == pytest.approx(sum(p[k] for k in parts))
