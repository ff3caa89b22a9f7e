"""lower-weight-only: int8 / int4 weight-only kernels, BiQGEMM for row-wise 2-4-bit codes, and the
dequantize-on-the-fly fallback against the fake-quant simulation (same dequantized weight, float activations).

Tolerance: rel_err <= 1e-5 (seen: <= 5e-7; the kernels accumulate in fp32 in another order).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qgraph
import qgraph.passes.lower_int8
import qgraph.passes.lower_weight_only  # registers lower-weight-only
from qgraph import PassContext, PassManager, PipelineError
from qgraph.kernels.int8 import DequantLinear, Int4WeightOnlyLinear, Int8WeightOnlyLinear
from qgraph.kernels.linear import BCQLinear
from qgraph.quant.qspec import Annotation, QSpec
from tests.conftest import rel_err

BASE = "fold-bn,dce,fuse-activation,annotate{act_bits=0},quantize-weights,insert-fq"
TOL = 1e-5
MODULES = {"int8_weight_only": Int8WeightOnlyLinear, "int4_weight_only": Int4WeightOnlyLinear,
           "dequant": DequantLinear, "biqgemm": BCQLinear}


class MatMulNet(nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.w = nn.Parameter(torch.randn(k, n) * 0.1)

    def forward(self, x):
        return torch.matmul(x, self.w)


def simulate(model, x, spec, frontend="fx", name=None):
    strategy = {name: Annotation(weight=spec)} if name else {}
    if not name:
        raise ValueError("give the qualname of the layer")
    return qgraph.quantize(model, (x,), target="x86-avx2", progress=False, frontend=frontend, pipeline=BASE,
                           strategy=strategy, calib=[(x,)])


def lower(sim, passes="lower-weight-only"):
    graph = sim.graph.copy()
    ctx = PassContext(target=sim.target, config={"progress": False})
    PassManager(passes).run(graph, ctx)
    return graph, ctx


def expected_kernel(spec: QSpec, k: int, layout: str) -> str:
    along_k = layout == "kn" and spec.granularity == "channel" and spec.axis == 0
    if along_k:
        return "dequant"
    if spec.bits == 8:
        ok = spec.symmetric and spec.signed and spec.granularity != "group"
        return "int8_weight_only" if ok else "dequant"
    if layout == "nk" and spec.axis == 0:
        return "biqgemm"  # the exact BCQ form of row-wise 2-4-bit codes
    if spec.granularity == "group":
        return "int4_weight_only" if spec.group_size in (32, 64, 128, 256) else "dequant"
    return "int4_weight_only" if k % 32 == 0 else "dequant"


spec_strategy = st.builds(
    lambda bits, signed, symmetric, gran, gs: QSpec.uniform(
        bits, signed=signed or symmetric, symmetric=symmetric, granularity=gran,
        group_size=gs if gran == "group" else None),
    st.sampled_from([2, 3, 4, 8]), st.booleans(), st.booleans(), st.sampled_from(["tensor", "channel", "group"]),
    st.sampled_from([16, 32, 64]),
)


@settings(max_examples=40, deadline=None)
@given(spec=spec_strategy, kmul=st.integers(1, 6), n=st.integers(1, 70), bias=st.booleans(),
       layout=st.sampled_from(["nk", "kn"]), seed=st.integers(0, 999))
def test_weight_only_matches_simulation(spec, kmul, n, bias, layout, seed):
    torch.manual_seed(seed)
    k = 32 * kmul if seed % 3 else 16 * kmul + 8  # mostly multiples of 32, sometimes not
    if spec.granularity == "group" and k % spec.group_size:
        spec = spec.replace(granularity="channel", group_size=None)
    if layout == "kn" and (spec.granularity == "group" or seed % 2):
        spec = spec.replace(axis=1)  # scales per output column of the [K, N] weight (groups along K)
    if layout == "nk":
        model, name = nn.Sequential(nn.Linear(k, n, bias=bias)).eval(), "0"
    else:
        model, name = MatMulNet(k, n).eval(), "matmul"
    x = torch.randn(3, 2, k)
    sim = simulate(model, x, spec, name=name)
    graph, ctx = lower(sim)
    [entry] = ctx.report["lowering"]
    want = expected_kernel(spec, k, layout)
    assert entry["status"] == "lowered" and entry["kernel"] == want, (spec, k, layout, entry)
    mods = [m for m in graph.gm.modules() if isinstance(m, tuple(MODULES.values()))]
    assert len(mods) == 1 and isinstance(mods[0], MODULES[want])
    assert not {"Gemm", "MatMul"} & {graph.op_type(nd) for nd in graph.nodes()}
    x2 = torch.randn(4, 2, k)
    with torch.no_grad():
        assert rel_err(graph(x2), sim(x2)) <= TOL


def test_int4_pads_output_channels_to_16_and_reports_containers():
    torch.manual_seed(0)
    model = MatMulNet(64, 10).eval()  # a [K, N] weight: torch's int4 kernel, not BiQGEMM
    x = torch.randn(5, 64)
    sim = simulate(model, x, QSpec.uniform(3, granularity="group", group_size=32, axis=1), name="matmul")
    graph, ctx = lower(sim)
    [entry] = ctx.report["lowering"]
    assert entry["kernel"] == "int4_weight_only" and "3-bit codes in 4-bit containers" in entry["reason"]
    mod = next(m for m in graph.gm.modules() if isinstance(m, Int4WeightOnlyLinear))
    assert mod.codes_u4.shape == (16, 64) and mod.scales_and_zeros.shape == (2, 16, 2)
    with torch.no_grad():
        assert rel_err(graph(x), sim(x)) <= TOL


def test_row_wise_low_bit_linears_run_on_biqgemm_in_exact_mode():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(96, 40)).eval()
    x = torch.randn(3, 96)
    sim = simulate(model, x, QSpec.uniform(4, granularity="group", group_size=32), name="0")
    graph, ctx = lower(sim)
    [entry] = ctx.report["lowering"]
    assert entry["kernel"] == "biqgemm" and "exact BCQ form" in entry["reason"]
    mod = next(m for m in graph.gm.modules() if isinstance(m, BCQLinear))
    assert mod.mode == "exact" and mod.bits == 4
    with torch.no_grad():
        for rows in (1, 64):  # the LUT path and the many-row path
            xr = torch.randn(rows, 96)
            assert rel_err(graph(xr), sim(xr)) <= TOL


def test_fallback_float_leaves_the_simulation_in_place():
    torch.manual_seed(1)
    model = MatMulNet(48, 16).eval()
    x = torch.randn(2, 48)
    sim = simulate(model, x, QSpec.uniform(4, granularity="group", group_size=16, axis=1), name="matmul")
    graph, ctx = lower(sim, "lower-weight-only{fallback=float}")
    [entry] = ctx.report["lowering"]
    assert entry["status"] == "float" and "group sizes" in entry["reason"] and "simulation" in entry["reason"]
    assert [graph.op_type(n) for n in graph.nodes()] == ["MatMul"]
    graph, ctx = lower(sim)
    assert ctx.report["lowering"][0]["kernel"] == "dequant"
    assert "dequantize-on-the-fly" in ctx.report["lowering"][0]["reason"]


def test_export_frontend_and_3d_inputs():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
    x = torch.randn(2, 7, 64)
    sim = qgraph.quantize(model, (x,), progress=False, frontend="export",
                          pipeline="fold-bn,dce,fuse-activation,annotate{act_bits=0,bits=4,group_size=32},"
                                   "quantize-weights,insert-fq")
    graph, ctx = lower(sim)
    assert [e["kernel"] for e in ctx.report["lowering"]] == ["biqgemm", "biqgemm"]
    with torch.no_grad():
        assert rel_err(graph(x), sim(x)) <= TOL


def test_w8a8_nodes_are_left_to_lower_int8():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 32)
    sim = qgraph.quantize(model, (x,), calib=[x], progress=False,
                          pipeline="annotate{act_bits=7},calibrate,quantize-weights,insert-fq")
    _, ctx = lower(sim)
    assert ctx.report.get("lowering", []) == []
    graph, ctx = lower(sim, "lower-int8,lower-weight-only")
    assert [e["kernel"] for e in ctx.report["lowering"]] == ["int8_gemm", "int8_gemm"]
    assert [graph.op_type(n) for n in graph.nodes()] == ["Int8Gemm", "Relu", "Int8Gemm"]


def test_missing_quantized_weights_is_a_typed_error():
    x = torch.randn(2, 8)
    with pytest.raises(PipelineError, match="run quantize-weights before lower-weight-only"):
        qgraph.quantize(nn.Sequential(nn.Linear(8, 4)).eval(), (x,), progress=False,
                        pipeline="annotate{act_bits=0},lower-weight-only")


def test_lowered_model_keeps_integer_weights_only():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    x = torch.randn(2, 64)
    sim = simulate(model, x, QSpec.uniform(8, granularity="channel"), name="0")
    graph, _ = lower(sim, "lower-weight-only,dce")
    floats = [k for k, v in graph.gm.state_dict().items() if v.is_floating_point() and v.numel() >= 64 * 32]
    assert floats == []
    assert any(v.dtype == torch.int8 and v.shape == (32, 64) for v in graph.gm.state_dict().values())


@pytest.mark.parametrize("chunk_bytes", [4 * 64 * 7, 4 * 64 * 64, 1 << 20])
def test_int8_weight_only_op_matches_dequantized_linear_across_chunks(monkeypatch, chunk_bytes):
    """``qgraph::int8_weight_only_linear`` dequantizes a chunk of weight rows at a time (7 rows, 64, or all)."""
    import qgraph.kernels.int8 as int8

    monkeypatch.setattr(int8, "INT8_WO_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(6)
    codes = torch.randint(-127, 128, (100, 64), generator=g, dtype=torch.int8)
    scale = torch.rand(100, generator=g) * 0.01 + 1e-3
    bias = torch.randn(100, generator=g)
    mod = Int8WeightOnlyLinear(codes, scale, bias)
    for rows in (1, 5):
        x = torch.randn(2, rows, 64, generator=g)
        want = torch.nn.functional.linear(x, codes.float() * scale[:, None], bias)
        assert rel_err(mod(x), want) <= 1e-6
