"""The torch reference (semantics) and the pure-torch LUT baseline."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.errors import KernelError
from qgraph.kernels.reference import LutTorchWeight, biqgemm_lut_torch, biqgemm_reference, lut_tables
from qgraph.quant.bcq_weight import BCQWeight
from tests.conftest import rel_err


def random_bcq(m, k, q, group_size, offset, seed=0) -> BCQWeight:
    g = torch.Generator().manual_seed(seed)
    gs = group_size or k
    groups = -(-k // gs)
    signs = torch.randint(0, 2, (q, m, k), generator=g) * 2 - 1
    alpha = torch.rand(q, m, groups, generator=g) + 0.05
    z = torch.randn(m, groups, generator=g) * 0.1 if offset else None
    return BCQWeight.from_signs(signs, alpha, z, gs)


shapes = st.tuples(
    st.integers(1, 48),  # M
    st.integers(1, 200),  # K
    st.integers(1, 4),  # q
    st.sampled_from([None, 4, 32, 33, 64, 7]),  # group size (None = row)
    st.booleans(),  # offset
    st.booleans(),  # bias
    st.integers(1, 9),  # batch
)


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 2**16))
def test_reference_is_x_times_dequantized(shape, seed):
    m, k, q, gs, off, has_bias, n = shape
    w = random_bcq(m, k, q, min(gs or k, k), off, seed)
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    bias = torch.randn(m) if has_bias else None
    y = biqgemm_reference(x, w, bias)
    dense = x.double() @ w.dequantize().double().t() + (0 if bias is None else bias.double())
    assert y.dtype == torch.float32 and y.shape == (n, m)
    # fp32 sums, bounded by the sum of |x||w| (+ |bias|): one output row can cancel to ~0 (CI drew k=173, m=1)
    mag = x.abs().double() @ w.dequantize().abs().double().t() + (0 if bias is None else bias.abs().double())
    assert bool(((y.double() - dense).abs() <= 1e-5 * mag + 1e-7).all())


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 2**16))
def test_lut_torch_matches_reference(shape, seed):
    m, k, q, gs, off, has_bias, n = shape
    w = random_bcq(m, k, q, min(gs or k, k), off, seed)
    x = torch.randn(2, n, k, generator=torch.Generator().manual_seed(seed))
    bias = torch.randn(m) if has_bias else None
    ref = biqgemm_reference(x, w, bias)
    y = biqgemm_lut_torch(x, LutTorchWeight.prepare(w), bias)
    assert y.shape == (2, n, m)
    assert rel_err(y, ref) <= 1e-5


def test_lut_tables_are_all_signed_sums():
    x = torch.randn(3, 8)
    t = lut_tables(x, group_size=8, chunks=2)  # [3, 2, 16]
    for key in range(16):
        signs = torch.tensor([1.0 if key >> s & 1 else -1.0 for s in range(4)])
        expect = (x.reshape(3, 2, 4) * signs).sum(-1)
        torch.testing.assert_close(t[:, :, key], expect, rtol=0, atol=1e-6)


def test_low_precision_input_computes_in_fp32():
    w = random_bcq(16, 64, 3, 32, True)
    x = torch.randn(4, 64).to(torch.bfloat16)
    y = biqgemm_reference(x, w)
    assert y.dtype == torch.bfloat16
    exact = x.float() @ w.dequantize().t()
    assert torch.equal(y, exact.to(torch.bfloat16))


def test_reference_rejects_bad_inputs():
    w = random_bcq(8, 16, 2, None, False)
    with pytest.raises(KernelError, match="shape"):
        biqgemm_reference(torch.randn(2, 15), w)
    with pytest.raises(KernelError, match="float"):
        biqgemm_reference(torch.ones(2, 16, dtype=torch.int32), w)
    with pytest.raises(KernelError, match="bias"):
        biqgemm_reference(torch.randn(2, 16), w, torch.randn(7))
    with pytest.raises(KernelError, match="BCQWeight"):
        biqgemm_reference(torch.randn(2, 16), torch.randn(8, 16))
