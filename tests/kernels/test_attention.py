"""``qgraph::decode_attention``: the native CPU kernel against torch's SDPA (grouped heads, masks), and its errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.errors import KernelError
from qgraph.kernels import native
from qgraph.kernels.attention import _impl, decode_attention


@pytest.fixture(autouse=True, scope="module")
def _native_shim():
    """Every test here runs the native kernel (decode_attention) beside the reference (_impl)."""
    assert native.load(), native.status()


def _sdpa(q, k, v, mask, scale):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), kvh=st.integers(1, 3), rep=st.integers(1, 4), s=st.integers(1, 70),
       d=st.sampled_from([8, 16, 17, 64]), masked=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_sdpa_with_grouped_heads_and_masks(b, kvh, rep, s, d, masked, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, kvh * rep, 1, d, generator=g)
    k, v = torch.randn(b, kvh, s, d, generator=g), torch.randn(b, kvh, s, d, generator=g)
    mask = None
    if masked:
        mask = torch.rand(b, 1, 1, s, generator=g) < 0.7
        mask[..., 0] = True  # at least one position per row
    scale = d ** -0.5
    want = _sdpa(q, k, v, mask, scale)
    for got in (decode_attention(q, k, v, mask, scale), _impl(q, k, v, mask, scale)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_native_kernel_is_the_one_running():
    assert native.load(), native.status()
    q, k = torch.randn(1, 6, 1, 32), torch.randn(1, 2, 40, 32)
    mask = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    mask[..., 30:] = False
    k2 = k.clone()
    k2[:, :, 30:] = float("nan")  # masked positions are never read by either implementation's result
    torch.testing.assert_close(decode_attention(q, k2, k, mask), decode_attention(q, k, k, mask), rtol=0, atol=0)


def test_all_masked_rows_are_zeros_in_both_implementations():
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16)
    mask = torch.zeros(1, 1, 1, 8, dtype=torch.bool)
    assert decode_attention(q, k, k, mask).abs().max() == 0 and _impl(q, k, k, mask, 0.25).abs().max() == 0


def test_non_contiguous_inputs_are_accepted():
    q = torch.randn(1, 1, 4, 16).transpose(1, 2)  # [1, 4, 1, 16], a view
    k = torch.randn(1, 16, 2, 8).permute(0, 2, 3, 1)  # [1, 2, 8, 16], not contiguous
    torch.testing.assert_close(decode_attention(q, k, k), _sdpa(q, k, k, None, 0.25), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case, match", [
    (lambda: (torch.randn(1, 4, 2, 16), torch.randn(1, 2, 8, 16), None), "one query row|q \\[B, H, 1, D\\]"),
    (lambda: (torch.randn(1, 4, 1, 16).double(), torch.randn(1, 2, 8, 16).double(), None), "float32"),
    (lambda: (torch.randn(1, 3, 1, 16), torch.randn(1, 2, 8, 16), None), "multiple of KVH"),
    (lambda: (torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16), torch.ones(1, 1, 1, 8)), "mask must be bool"),
    (lambda: (torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16), torch.ones(1, 1, 1, 7, dtype=torch.bool)),
     "mask must be bool"),
])
def test_bad_input_is_a_kernel_error(case, match):
    q, k, mask = case()
    with pytest.raises(KernelError, match=match):
        decode_attention(q, k, k, mask)
    with pytest.raises(KernelError, match=match):
        _impl(q, k, k, mask, 0.25)
