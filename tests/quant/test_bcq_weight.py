import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.errors import SpecError
from qgraph.quant.bcq import _pack_planes, quantize_bcq
from qgraph.quant.bcq_weight import BCQWeight, pack_signs, unpack_signs


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_pack_unpack_lossless(q, m, k, seed):
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (q, m, k), generator=g).to(torch.int8) * 2 - 1
    packed = pack_signs(signs)
    assert packed.dtype == torch.uint8 and packed.shape == (q, m, (k + 7) // 8)
    assert torch.equal(unpack_signs(packed, k), signs)
    if k % 8:  # padding bits past K are 0
        assert int((packed[..., -1] >> (k % 8)).max()) == 0


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_code_packer_matches_pack_signs(bits, m, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (m, k), generator=g).to(torch.uint8)
    ref = torch.stack([pack_signs(((codes >> i) & 1).bool()) for i in range(bits)])
    assert torch.equal(_pack_planes(codes, bits), ref)


def test_lsb_first_layout():
    signs = torch.tensor([[[1, -1, -1, -1, -1, -1, -1, -1, 1]]])  # bit 0 and bit 8 set
    packed = pack_signs(signs)
    assert packed.tolist() == [[[1, 1]]]


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("shape,gs,bits", [((8, 64), None, 3), ((5, 37), 16, 2), ((3, 9), 4, 4)])
def test_save_load_lossless(tmp_path, shape, gs, bits, offset):
    torch.manual_seed(0)
    w = torch.randn(shape)
    bq = quantize_bcq(w, bits, group_size=gs, method="alternating", offset=offset)
    path = tmp_path / "w.safetensors"
    bq.save(path)
    back = BCQWeight.load(path)
    assert back.shape == bq.shape and back.group_size == bq.group_size and back.bits == bits
    assert torch.equal(back.planes, bq.planes) and torch.equal(back.alpha, bq.alpha)
    assert (back.offset is None) == (not offset)
    if offset:
        assert torch.equal(back.offset, bq.offset)
    assert torch.equal(back.dequantize(), bq.dequantize())


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 40), st.none() | st.integers(1, 40),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_dequantize_is_sum_of_alpha_times_signs(q, m, k, gs, offset, seed):
    g = torch.Generator().manual_seed(seed)
    gs = min(gs or k, k)
    ng = -(-k // gs)
    signs = torch.randint(0, 2, (q, m, k), generator=g).float() * 2 - 1
    alpha = torch.rand(q, m, ng, generator=g)
    z = torch.randn(m, ng, generator=g) if offset else None
    bq = BCQWeight.from_signs(signs, alpha, z, group_size=gs)
    ref = torch.zeros(m, k)
    for i in range(q):
        for c in range(k):
            ref[:, c] += alpha[i, :, c // gs] * signs[i, :, c]
    if offset:
        for c in range(k):
            ref[:, c] += z[:, c // gs]
    assert torch.allclose(bq.dequantize(), ref, atol=1e-5)
    assert torch.equal(bq.signs().float(), signs)


def test_validation_errors(tmp_path):
    planes = torch.zeros(2, 4, 1, dtype=torch.uint8)
    with pytest.raises(SpecError, match="alpha"):
        BCQWeight(planes=planes, alpha=torch.zeros(2, 4, 3), offset=None, shape=(4, 8), group_size=4)
    with pytest.raises(SpecError, match="group_size"):
        BCQWeight(planes=planes, alpha=torch.zeros(2, 4, 1), offset=None, shape=(4, 8), group_size=9)
    with pytest.raises(SpecError, match="format"):
        BCQWeight.from_parts({"format": "other"}, {})
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(SpecError, match="manifest"):
        BCQWeight.load(tmp_path / "x.safetensors")
