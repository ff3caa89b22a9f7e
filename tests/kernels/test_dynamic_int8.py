"""Dynamic int8 activations: QSpec rules, the simulation op, the lowered kernel, and the passes end to end.

Tolerances:
- kernel vs its simulation on the same input: both round the same codes (one shared function computes them),
  the kernel accumulates in int32 and the simulation in float32, so the difference is float rounding of a
  K-term sum: rel_err <= 1e-5 (seen <= 4e-7);
- lowered model vs simulated model (several layers): a token scale or code can move by one step where a float
  value sits on a rounding tie, so the bound is 1e-3 relative (seen <= 5e-7 on these sizes).
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qgraph
from qgraph import PassContext, PassManager
from qgraph.api import lowering_pipeline
from qgraph.errors import KernelError, SpecError
from qgraph.kernels.dynamic_int8 import DynamicInt8Linear, fake_quant_dynamic
from qgraph.quant import uniform
from qgraph.quant.qspec import Annotation, QSpec
from tests.conftest import rel_err

KERNEL_TOL = 1e-5


def test_spec_text_round_trip_and_rules():
    s = QSpec.parse("int8/token/sym/dynamic")
    assert s.dynamic and s.granularity == "token" and str(s) == "int8/token/sym/dynamic"
    assert QSpec.from_dict(s.to_dict()) == s
    assert str(QSpec.uniform(8, dynamic=True)) == "int8/tensor/sym/dynamic"
    with pytest.raises(SpecError, match="needs dynamic=True"):
        QSpec.uniform(8, granularity="token")
    with pytest.raises(SpecError, match="per 'token' or per 'tensor'"):
        QSpec.uniform(8, granularity="channel", dynamic=True)
    with pytest.raises(SpecError, match="bcq is weight-only"):
        QSpec(scheme="bcq", bits=3, granularity="channel", dynamic=True)
    with pytest.raises(SpecError, match="pow2"):
        QSpec.uniform(8, dynamic=True, pow2_scale=True)
    with pytest.raises(SpecError, match="for activations"):
        Annotation(weight=QSpec.uniform(8, dynamic=True))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["token", "tensor"]), st.booleans(), st.integers(2, 8), st.integers(0, 10_000))
def test_dynamic_fake_quant_round_trip_within_half_step(gran, sym, bits, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 17, generator=g) * torch.rand(3, 4, 1, generator=g) * 10
    spec = QSpec.uniform(bits, granularity=gran, symmetric=sym, dynamic=True)
    scale, zp = uniform.dynamic_qparams(x, spec)
    assert scale.shape == ((3, 4, 1) if gran == "token" else ())
    y = uniform.fake_quantize_dynamic(x, spec)
    assert torch.equal(y, fake_quant_dynamic(x, spec))
    # inside the codes' float range a round trip moves a value by at most half a step; the rounded zero point
    # can leave the extreme value of an asymmetric range up to one step outside it
    err, s, z = (y - x).abs(), scale, zp.float()
    inside = (x >= s * (spec.qmin - z)) & (x <= s * (spec.qmax - z))
    assert bool((err[inside] <= (s / 2 * (1 + 1e-5) + 1e-7).expand_as(x)[inside]).all())
    assert bool((err <= s * (1 + 1e-5) + 1e-7).all())
    codes, s2, z2 = uniform.quantize_dynamic(x, spec)
    assert torch.equal(s2, scale) and torch.equal(z2, zp)
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax


@settings(max_examples=30, deadline=None)
@given(k=st.integers(2, 70), n=st.integers(1, 40), lead=st.sampled_from([(5,), (2, 3), (1,)]),
       gran=st.sampled_from(["token", "tensor"]), sym=st.booleans(), impl=st.sampled_from(["onednn", "int_mm"]),
       bias=st.booleans(), seed=st.integers(0, 999))
def test_kernel_matches_simulation(k, n, lead, gran, sym, impl, bias, seed):
    if impl == "onednn" and not sym:
        impl = "int_mm"
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g) if bias else None
    x = torch.randn(*lead, k, generator=g) * 3
    spec = QSpec.uniform(8, granularity=gran, symmetric=sym, dynamic=True)
    codes, scale, _ = uniform.quantize_weight(w, QSpec.uniform(8, granularity="channel"))
    y = DynamicInt8Linear(codes, scale, b, spec, impl=impl)(x)
    ref = F.linear(fake_quant_dynamic(x, spec), codes.float() * scale[:, None], b)
    assert y.shape == ref.shape
    assert rel_err(y, ref) <= KERNEL_TOL


def test_kernel_rejects_bad_input():
    codes = torch.zeros(4, 8, dtype=torch.int8)
    spec = QSpec.uniform(8, granularity="token", dynamic=True)
    with pytest.raises(KernelError, match="signed int8"):
        DynamicInt8Linear(codes.to(torch.uint8), torch.ones(4), None, spec)
    with pytest.raises(KernelError, match="dynamic activation spec"):
        DynamicInt8Linear(codes, torch.ones(4), None, QSpec.uniform(8))
    with pytest.raises(KernelError, match="impl"):
        DynamicInt8Linear(codes, torch.ones(4), None, spec, impl="fast")
    with pytest.raises(KernelError, match=r"\[\.\.\., 8\]"):
        DynamicInt8Linear(codes, torch.ones(4), None, spec)(torch.zeros(2, 7))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(24, 48), nn.Linear(48, 16)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


def _quantize(model, pipeline, x):
    return qgraph.quantize(model, (x,), target="x86-avx2", calib=[(x,)], progress=False, pipeline=pipeline)


SIM = "annotate{{act_bits=8,act_dynamic={gran}}},calibrate,quantize-weights,insert-fq"


@pytest.mark.parametrize("gran", ["token", "tensor"])
def test_pipeline_lowers_dynamic_gemms_within_tolerance(gran):
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(6, 10, 24)
    sim = _quantize(model, SIM.format(gran=gran), x)
    anns = [n.meta["qgraph.annotation"] for n in sim.gm.graph.nodes if "qgraph.annotation" in n.meta]
    assert [a.inputs[0].dynamic for a in anns] == [True, True]
    assert "qgraph.qparams" not in str([n.meta.keys() for n in sim.gm.graph.nodes])  # nothing calibrated
    graph = sim.graph.copy()
    ctx = PassContext(target=sim.target, config={"progress": False})
    PassManager("lower-int8").run(graph, ctx)
    mods = [m for m in graph.gm.modules() if isinstance(m, DynamicInt8Linear)]
    assert len(mods) == 2 and all(m.spec.granularity == gran for m in mods)
    assert not any("fake_quant_dynamic" in str(n.target) for n in graph.gm.graph.nodes)
    with torch.no_grad():
        assert rel_err(graph.gm(x), sim(x)) <= 1e-3
    # lowered through the full lowering pipeline, verify holds it to the simulation
    q = _quantize(model, lowering_pipeline(f"act_bits=8,act_dynamic={gran}"), x)
    assert q.report["verify"]["output_rel_err"] <= 1e-3
    assert sum(r["status"] == "lowered" and r["kernel"] == "int8_gemm" for r in q.report["lowering"]) == 2


def test_dynamic_activations_need_no_calibration_data():
    torch.manual_seed(1)
    model, x = MLP().eval(), torch.randn(4, 24)
    q = qgraph.quantize(model, (x,), target="x86-avx2", progress=False, pipeline=SIM.format(gran="token"))
    with torch.no_grad():
        assert F.cosine_similarity(q(x), model(x), dim=-1).min() > 0.999


def test_target_default_can_be_dynamic_and_off_turns_it_static(tmp_path):
    torch.manual_seed(2)
    model, x = MLP().eval(), torch.randn(4, 24)
    path = tmp_path / "dyn.toml"
    path.write_text('inherits = "x86-avx512-vnni"\nname = "dyn"\n[defaults]\nactivation = "int8/token/sym/dynamic"\n')

    def acts(pipeline):
        q = qgraph.quantize(model, (x,), target=str(path), calib=[(x,)], progress=False, pipeline=pipeline)
        return [n.meta["qgraph.annotation"].inputs[0] for n in q.gm.graph.nodes if "qgraph.annotation" in n.meta]

    assert [str(a) for a in acts("annotate,calibrate,quantize-weights,insert-fq")] == ["int8/token/sym/dynamic"] * 2
    static = acts("annotate{act_dynamic=off},calibrate,quantize-weights,insert-fq")
    assert static and all(not a.dynamic and a.granularity == "tensor" for a in static)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.c(x).mean((2, 3)))


def test_conv_gets_per_tensor_dynamic_and_stays_float_with_a_reason():
    torch.manual_seed(3)
    model, x = ConvNet().eval(), torch.randn(2, 3, 8, 8)
    q = _quantize(model, lowering_pipeline("act_bits=8,act_dynamic=token"), x)
    rows = {r["op"]: r for r in q.report["lowering"]}
    assert rows["Conv"]["status"] == "float" and "dynamic" in rows["Conv"]["reason"]
    assert rows["Gemm"]["status"] == "lowered"
    assert any("no tokens" in n for n in q.report["annotate"]["notes"])
    strategy = {"c": Annotation(weight=QSpec.uniform(8, granularity="channel"),
                                inputs={0: QSpec.uniform(8, granularity="token", dynamic=True)})}
    with pytest.raises(SpecError, match="conv inputs have no tokens"):
        qgraph.quantize(model, (x,), target="x86-avx2", progress=False, pipeline="annotate{act_bits=8}",
                        strategy=strategy)


def test_target_without_token_granularity_refuses_it():
    torch.manual_seed(4)
    model, x = MLP().eval(), torch.randn(4, 24)
    with pytest.raises(qgraph.QGraphError, match="granularity 'token'"):
        qgraph.quantize(model, (x,), target="npu-int8", progress=False,
                        pipeline="annotate{act_bits=8,act_dynamic=token},check-target,calibrate")


def test_asymmetric_dynamic_lowers_to_the_exact_int_mm_path():
    torch.manual_seed(5)
    model, x = MLP().eval(), torch.randn(6, 10, 24)
    q = _quantize(model, lowering_pipeline("act_bits=8,act_dynamic=token,act_symmetric=false"), x)
    mods = [m for m in q.gm.modules() if isinstance(m, DynamicInt8Linear)]
    assert len(mods) == 2 and all(not m.spec.symmetric and m.impl == "int_mm" for m in mods)
    assert q.report["verify"]["max_local_rel_err"] <= KERNEL_TOL


@pytest.mark.parametrize("sym", ["true", "false"])
def test_dynamic_lowered_model_saves_and_loads_bit_identical(tmp_path, sym):
    from qgraph.artifact import load_artifact, save_artifact

    torch.manual_seed(6)
    model, x = MLP().eval(), torch.randn(6, 10, 24)
    q = _quantize(model, lowering_pipeline(f"act_bits=8,act_dynamic=token,act_symmetric={sym}"), x)
    save_artifact(q, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(load_artifact(tmp_path / "a")(x), q(x))


def test_dynamic_specs_on_an_onnx_graph_are_a_typed_error():
    from qgraph.ir.onnx import load_onnx
    from tests.ir.test_onnx_adapter import _mlp_proto

    with pytest.raises(SpecError, match="simulated on fx graphs only"):
        qgraph.quantize(load_onnx(_mlp_proto()), calib=[torch.randn(4, 16)], progress=False,
                        pipeline="annotate{act_bits=8,act_dynamic=token},calibrate,quantize-weights,insert-fq")
