"""Sibling Linears that read one input (q/k/v, gate/up) fused into one BiQGEMM call: same logits, fewer calls,
order-independent, compiles, and groups that cannot stack are left alone."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qgraph.llm import LMRecipe, apply_weights, fuse_shared_inputs, quantize_lm
from qgraph.llm.modules import BCQSlice
from qgraph.llm.runtime import Generator


class _CountBiqgemm(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += "biqgemm" in str(func)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def weights(tiny):
    return quantize_lm(tiny, LMRecipe(bits=3, group_size=32, optimizer="rtn"))


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_fused_model_gives_the_same_logits_with_fewer_calls(tiny, weights, mode, one_thread):
    plain = apply_weights(copy.deepcopy(tiny), weights, mode=mode)
    fused = apply_weights(copy.deepcopy(tiny), weights, mode=mode)
    assert fuse_shared_inputs(fused) == 2 * 2  # (q/k/v, gate/up) x 2 layers
    ids = torch.tensor([[5, 9, 33, 7, 100]])
    counts = []
    with torch.no_grad():
        for m in (plain, fused):
            with _CountBiqgemm() as c:
                out = m(ids).logits
            counts.append((out, c.calls))
    (a, na), (b, nb) = counts
    assert torch.allclose(a, b, rtol=0, atol=1e-5 * float(a.abs().max()))
    assert (na, nb) == (2 * 7 + 1, 2 * 4 + 1)  # 7 Linears a layer + head -> 4 calls a layer + head


def test_members_called_out_of_order_or_alone_still_give_their_rows(tiny, weights):
    fused = apply_weights(copy.deepcopy(tiny), weights)
    attn = fused.model.layers[0].self_attn
    plain = apply_weights(copy.deepcopy(tiny), weights).model.layers[0].self_attn
    fuse_shared_inputs(fused)
    assert isinstance(attn.k_proj, BCQSlice)
    x, x2 = torch.randn(3, 64), torch.randn(3, 64)
    with torch.no_grad():
        got = [attn.v_proj(x), attn.q_proj(x), attn.v_proj(x2), attn.k_proj(x), attn.k_proj(x2)]
        ref = [plain.v_proj(x), plain.q_proj(x), plain.v_proj(x2), plain.k_proj(x), plain.k_proj(x2)]
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, atol=1e-6)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(attn, name)(x)
    assert attn.k_proj._last.x is None  # an output every member has read is not kept alive


def test_compiled_fused_decode_gives_the_same_tokens(tiny, weights, one_thread):
    ids = torch.tensor([[5, 9, 33, 7]])
    ref = Generator(apply_weights(copy.deepcopy(tiny), weights), None).generate(ids, 10, stop_at_eos=False)
    fused = apply_weights(copy.deepcopy(tiny), weights)
    fuse_shared_inputs(fused)
    g = Generator(fused, None, compile=True, backend="eager")
    got = g.generate(ids, 10, stop_at_eos=False)
    assert g.compile and torch.equal(got.ids, ref.ids)


def test_groups_that_cannot_stack_are_left_alone(tiny, weights):
    m = apply_weights(copy.deepcopy(tiny), weights)
    attn = m.model.layers[0].self_attn
    attn.v_proj.mode = "fast"  # one member differs
    assert fuse_shared_inputs(m) == 2 * 2 - 1
    assert not isinstance(attn.q_proj, BCQSlice) and isinstance(m.model.layers[1].self_attn.q_proj, BCQSlice)
