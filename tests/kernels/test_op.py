"""``torch.ops.qgraph.biqgemm`` (layouts, fake kernel, fx / export / compile) and `BCQLinear`."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qgraph.errors import KernelError
from qgraph.kernels import BCQLinear, biqgemm, biqgemm_reference, cpu, get_layout, pack, register_layout
from tests.conftest import rel_err
from tests.kernels.test_reference import random_bcq

LAYOUTS = ["planes"] + (["cpu-lut4"] if cpu.available() else [])
SCHEMA = (
    "qgraph::biqgemm(Tensor x, Tensor packed, Tensor alpha, Tensor? offset, Tensor? bias, int out_features, "
    'int in_features, int group_size, str layout, str mode="exact") -> Tensor'
)


def test_schema_is_fixed():
    assert str(torch.ops.qgraph.biqgemm.default._schema) == SCHEMA


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 70), st.integers(1, 150), st.integers(1, 4), st.sampled_from([None, 32, 33]),
       st.booleans(), st.sampled_from(LAYOUTS), st.integers(0, 999))
def test_op_matches_reference(m, k, q, gs, off, layout, seed):
    w = random_bcq(m, k, q, min(gs or k, k), off, seed)
    x = torch.randn(2, 3, k)
    bias = torch.randn(m)
    p = pack(w, layout)
    y = torch.ops.qgraph.biqgemm(x, p.packed, p.alpha, p.offset, bias, m, k, w.group_size, layout)
    assert y.shape == (2, 3, m)
    assert rel_err(y, biqgemm_reference(x, w, bias)) <= 1e-5


def test_convenience_and_dtypes():
    w = random_bcq(48, 96, 3, 32, True)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 96).to(dtype)
        y = biqgemm(x, w)
        assert y.dtype == dtype
        assert rel_err(y.float(), biqgemm_reference(x.float(), w)) <= (1e-5 if dtype == torch.float32 else 1e-2)
    assert biqgemm(torch.randn(2, 96), w) is not None and pack(w).layout == LAYOUTS[-1]
    if cpu.available():
        y_fast = biqgemm(torch.randn(2, 96), cpu.pack(w), mode="fast")
        assert y_fast.shape == (2, 48)


def test_op_errors():
    w = random_bcq(16, 32, 2, None, False)
    p = pack(w, "planes")
    x = torch.randn(2, 32)
    with pytest.raises(KernelError, match="unknown BiQGEMM layout"):
        torch.ops.qgraph.biqgemm(x, p.packed, p.alpha, None, None, 16, 32, 32, "gpu-magic")
    with pytest.raises(KernelError, match="mode"):
        torch.ops.qgraph.biqgemm(x, p.packed, p.alpha, None, None, 16, 32, 32, "planes", "fastest")
    with pytest.raises(KernelError, match="planes"):
        torch.ops.qgraph.biqgemm(x, p.packed, p.alpha, None, None, 16, 32, 16, "planes")
    with pytest.raises(KernelError, match="shape"):
        torch.ops.qgraph.biqgemm(torch.randn(2, 31), p.packed, p.alpha, None, None, 16, 32, 32, "planes")
    with pytest.raises(KernelError, match="already registered"):
        register_layout("planes", get_layout("planes").impl)
    with pytest.raises(KernelError, match="BCQWeight"):
        biqgemm(x, torch.randn(16, 32))


def test_custom_layout_registration():
    calls = []

    def impl(x, packed, alpha, offset, bias, m, k, gs, mode):
        calls.append(mode)
        return biqgemm_reference(x, get_layout("planes").unpack(packed, alpha, offset, m, k, gs), bias)

    register_layout("test-dummy", impl, pack=get_layout("planes").pack, unpack=get_layout("planes").unpack,
                    replace=True)
    w = random_bcq(8, 16, 2, None, False)
    lin = BCQLinear(w, layout="test-dummy", mode="fast")
    x = torch.randn(3, 16)
    assert rel_err(lin(x), biqgemm_reference(x, w)) <= 1e-6 and calls == ["fast"]


class TwoLayer(nn.Module):
    def __init__(self, layout=None):
        super().__init__()
        w = random_bcq(40, 70, 3, 32, True, seed=5)
        self.pre = nn.Linear(70, 70)
        self.q = BCQLinear(w, torch.randn(40), layout=layout)

    def forward(self, x):
        return torch.relu(self.q(self.pre(x)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_traces_with_fx_and_export(layout):
    m = TwoLayer(layout).eval()
    x = torch.randn(3, 70)
    ref = m(x)
    gm = torch.fx.symbolic_trace(m)
    assert torch.ops.qgraph.biqgemm in [n.target for n in gm.graph.nodes]
    assert torch.equal(gm(x), ref)
    ep = torch.export.export(m, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    assert torch.ops.qgraph.biqgemm.default in [n.target for n in ep.graph.nodes]
    assert rel_err(ep.module()(x), ref) <= 1e-6
    assert ep.module()(torch.randn(7, 70)).shape == (7, 40)


def test_compiles_without_graph_breaks():
    m = TwoLayer().eval()
    x = torch.randn(3, 70)
    ref = m(x)
    cm = torch.compile(m, backend="aot_eager", fullgraph=True)
    assert rel_err(cm(x), ref) <= 1e-6
    with torch.no_grad():
        cm2 = torch.compile(m, fullgraph=True)  # inductor
        assert rel_err(cm2(x), ref) <= 1e-5


def test_gradient_wrt_input_and_bias():
    m = TwoLayer()
    x = torch.randn(4, 70, requires_grad=True)
    m(x).sum().backward()
    dense = nn.Linear(70, 40)
    with torch.no_grad():
        dense.weight.copy_(m.q.bcq_weight().dequantize())
        dense.bias.copy_(m.q.bias)
    x2 = x.detach().clone().requires_grad_(True)
    torch.relu(dense(m.pre(x2))).sum().backward()
    assert rel_err(x.grad, x2.grad) <= 1e-5


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bcqlinear_state_dict_round_trip(layout, tmp_path):
    w = random_bcq(40, 70, 3, 33, True, seed=1)
    lin = nn.Linear(70, 40)
    a = BCQLinear.from_linear(lin, w, layout=layout)
    assert a.layout == layout and torch.equal(a.bias, lin.bias.detach())
    torch.save(a.state_dict(), tmp_path / "m.pt")
    b = BCQLinear(random_bcq(40, 70, 3, 33, True, seed=2), torch.zeros(40), layout=layout)
    b.load_state_dict(torch.load(tmp_path / "m.pt"))
    x = torch.randn(5, 70)
    assert torch.equal(a(x), b(x))
    w2 = b.bcq_weight()
    assert torch.equal(w2.planes, w.planes) and torch.equal(w2.alpha, w.alpha) and torch.equal(w2.offset, w.offset)
    other = BCQLinear(random_bcq(40, 70, 2, 33, True), torch.zeros(40), layout=layout)
    with pytest.raises(KernelError, match="bits"):
        other.load_state_dict(a.state_dict())


def test_bcqlinear_repack_and_errors():
    w = random_bcq(24, 50, 2, None, False)
    a = BCQLinear(w)
    x = torch.randn(2, 50)
    y = a(x)
    assert rel_err(a.repack("planes")(x), y) <= 1e-5 and a.layout == "planes"
    with pytest.raises(KernelError, match="does not match"):
        BCQLinear.from_linear(nn.Linear(50, 23), w)
    with pytest.raises(KernelError, match="bias"):
        BCQLinear(w, torch.zeros(3))
    with pytest.raises(KernelError, match="mode"):
        BCQLinear(w, mode="turbo")
    assert "bits=2" in repr(a)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout):
    w = random_bcq(40, 70, 3, 32, True)
    p = pack(w, layout)
    x = torch.randn(3, 70, requires_grad=True)
    args = (x, p.packed, p.alpha, p.offset, torch.randn(40, requires_grad=True), 40, 70, 32, layout, "exact")
    result = torch.library.opcheck(torch.ops.qgraph.biqgemm.default, args)
    assert set(result.values()) == {"SUCCESS"}
