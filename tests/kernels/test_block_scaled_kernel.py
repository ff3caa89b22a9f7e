"""The ``cpu-lut4k`` layout (uniform codes with block scales) on the CPU kernel: parity with the dequantized matrix on
every ISA, mode and path, through ctypes, ``torch.ops.qgraph.biqgemm`` and `BCQLinear`; the tied-table embedding
rows; packing round trips and bad buffers."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.errors import KernelError
from qgraph.kernels import cpu
from qgraph.kernels.linear import BCQLinear
from qgraph.llm.modules import BCQEmbedding
from qgraph.quant import block_scaled as bs
from qgraph.quant.qspec import QSpec
from tests.kernels.test_cpu_kernel import forced_isa

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the CPU kernel is not built")
TOL = {"exact": 1e-5, "fast": 3e-2}  # max |Δ| / max |y|: fp32 reordering; int8 tables (one scale per 32 x)


def weight(m, k, gs, bits, seed=0):
    spec = QSpec.uniform(bits, signed=False, symmetric=False, granularity="group", group_size=gs, scale_bits=6)
    g = torch.Generator().manual_seed(seed)
    return bs.quantize(torch.randn(m, k, generator=g) + 0.3 * torch.randn(m, 1, generator=g), spec)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 80), groups=st.integers(1, 4), gs=st.sampled_from([32, 64, 96]), bits=st.integers(2, 5),
       n=st.sampled_from([1, 2, 7]), isa=st.sampled_from(cpu.supported_isas()), seed=st.integers(0, 999))
def test_matches_the_dequantized_matrix(m, groups, gs, bits, n, isa, seed):
    with forced_isa(isa):
        _check_parity(m, groups, gs, bits, n, seed)


def _check_parity(m, groups, gs, bits, n, seed):
    q = weight(m, groups * gs, gs, bits, seed)
    p = cpu.pack_block_scaled(q)
    x = torch.randn(n, groups * gs, generator=torch.Generator().manual_seed(seed + 1))
    ref = (x.double() @ q.dequantize().double().T)
    # exact: fp32 sums in another order, bounded by the sum of |x||w| (a single output row can cancel to ~0)
    exact_bound = 1e-5 * (x.abs().double() @ q.dequantize().abs().double().T) + 1e-7
    for path in ("lut", "gemm"):
        y = cpu.biqgemm(x, p, mode="exact", path=path)
        assert bool(((y - ref).abs() <= exact_bound).all()), path
        # fast: within the kernel's worst-case bound for the same code in its BCQ form, plus fp32 reordering
        y = cpu.biqgemm(x, p, mode="fast", path=path)
        bound = cpu.fast_error_bound(x, q.to_bcq(), path).double() + exact_bound
        assert bool(((y - ref).abs() <= bound).all()), path


def test_pack_round_trip_and_kscale_rows():
    q = weight(70, 192, 32, 4)
    p = cpu.pack_block_scaled(q)
    back = cpu.unpack_block_scaled(p)
    for name in ("codes", "scale_codes", "min_codes", "super_scale", "super_min"):
        assert torch.equal(getattr(back, name), getattr(q, name)), name
    d, mn = cpu.kscale_rows(p.alpha, torch.tensor([0, 31, 32, 69]), 6)
    qd, qm = q.scales()
    assert torch.equal(d, qd[[0, 31, 32, 69]]) and torch.equal(mn, qm[[0, 31, 32, 69]])
    # fewer bytes than the same code in the fp32-alpha layout
    assert p.nbytes < 0.55 * cpu.pack(q.to_bcq()).nbytes


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_bcq_linear_and_the_op_take_the_block_layout(mode):
    q = weight(96, 128, 32, 4, seed=5)
    lin = torch.nn.Linear(128, 96)
    mod = BCQLinear.from_linear(lin, q, mode=mode)
    assert mod.layout == cpu.LAYOUT_K and mod.alpha.dtype == torch.uint8 and mod.offset is None
    x = torch.randn(3, 128)
    ref = x @ q.dequantize().T + lin.bias.detach()
    y = mod(x)
    assert float((y - ref).abs().max() / ref.abs().max()) < TOL[mode]
    # its BCQ form (gradients, other devices) is the same matrix
    assert torch.allclose(mod.bcq_weight().dequantize(), q.dequantize(), atol=1e-6)
    xg = x.clone().requires_grad_()
    mod(xg).sum().backward()
    assert torch.allclose(xg.grad, q.dequantize().sum(0).expand(3, -1), atol=1e-4)


def test_tied_embedding_rows_are_the_dequantized_table():
    q = weight(100, 64, 32, 4, seed=6)
    head = BCQLinear(q)
    emb = BCQEmbedding(head=head)
    ids = torch.tensor([[0, 5, 99], [31, 32, 64]])
    assert torch.equal(emb(ids), q.dequantize()[ids])
    assert emb.packed.data_ptr() == head.packed.data_ptr() and emb.alpha.data_ptr() == head.alpha.data_ptr()


def test_bad_block_buffers_are_refused():
    q = weight(64, 64, 32, 4)
    p = cpu.pack_block_scaled(q)
    x = torch.randn(1, 64)
    with pytest.raises(KernelError, match="block scales must be uint8"):
        cpu.biqgemm_cpu(x, p.packed, p.alpha[:, :-1].contiguous(), None, None, 64, 64, 32)
    with pytest.raises(KernelError, match="offset=None"):
        cpu.biqgemm_cpu(x, p.packed, p.alpha, torch.zeros(2, 2, 32), None, 64, 64, 32)
    with pytest.raises(KernelError, match="block scales must be uint8"):
        torch.ops.qgraph.biqgemm(x, p.packed, p.alpha[:1].contiguous(), None, None, 64, 64, 32, cpu.LAYOUT_K, "exact")
    wide = bs.quantize(torch.randn(32, 64), QSpec.uniform(4, signed=False, symmetric=False, granularity="group",
                                                          group_size=32, scale_bits=8))
    with pytest.raises(KernelError, match="up to 6 bits"):
        cpu.pack_block_scaled(wide)
    # ... which still runs through its BCQ form
    assert BCQLinear(wide).layout == cpu.LAYOUT
