"""RowwiseQuantizedEmbedding: nibble packing of signed and unsigned ≤4-bit codes, 8-bit rows, bad codes."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.errors import KernelError
from qgraph.kernels.embedding import RowwiseQuantizedEmbedding


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([2, 3, 4, 8]), st.booleans(), st.integers(1, 9), st.integers(1, 33), st.integers(0, 2**31 - 1))
def test_gather_equals_the_dequantized_table(bits, signed, vocab, dim, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    codes = torch.randint(lo, hi + 1, (vocab, dim), generator=g, dtype=torch.int16)
    codes = codes.to(torch.int8 if signed else torch.uint8)
    scale = torch.rand(vocab, generator=g) + 0.1
    zp = torch.randint(lo, hi + 1, (vocab,), generator=g).float()
    emb = RowwiseQuantizedEmbedding(codes, scale, zp, bits)
    ids = torch.randint(0, vocab, (3, 5), generator=g)
    want = (codes.float() - zp[:, None]) * scale[:, None]
    assert torch.equal(emb(ids), want[ids])
    if bits <= 4:
        assert emb.codes.shape == (vocab, (dim + 1) // 2)


def test_codes_wider_than_a_nibble_are_refused():
    with pytest.raises(KernelError, match="does not fit one nibble"):
        RowwiseQuantizedEmbedding(torch.tensor([[0, 16]], dtype=torch.int16), torch.ones(1), torch.zeros(1), 4)
