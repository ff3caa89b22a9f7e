"""The GraphView contract: passes written once run on torch.fx and on ONNX with the same decisions and results.

ONNX models here are built with onnx.helper (the adapter tests' MLP: Gemm + Relu + MatMul) or exported by
torch.onnx from the twin torch module (Gemm), and compared with the torch path on the same weights.
"""
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import qgraph
from qgraph import PassContext, PassManager, PipelineError, trace
from qgraph.api import lowering_pipeline
from qgraph.ir.onnx import load_onnx
from tests.conftest import rel_err
from tests.ir.test_onnx_adapter import _mlp_proto

BCQ3 = lowering_pipeline("scheme=bcq,bits=3,group_size=32")


def _twin(proto: onnx.ModelProto) -> nn.Module:
    """nn.Sequential(Linear, ReLU, Linear) with the weights of `_mlp_proto(k, h, n)` (transB=1)."""
    inits = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in proto.graph.initializer}
    h, k = inits["w1"].shape
    n = inits["w2"].shape[1]
    m = nn.Sequential(nn.Linear(k, h), nn.ReLU(), nn.Linear(h, n, bias=False)).eval()
    with torch.no_grad():
        m[0].weight.copy_(inits["w1"])
        m[0].bias.copy_(inits["b1"])
        m[2].weight.copy_(inits["w2"].T)
    return m


def _mlp(seed=0, k=64, h=96, n=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(k, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, n)).eval()


def _exported(model: nn.Module, x: torch.Tensor, path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    return str(path)


@pytest.fixture(scope="module")
def helper_mlp():
    proto = _mlp_proto(k=64, h=64, n=32)
    return proto, _twin(proto)


def test_onnx_adapter_answers_the_layer_questions(helper_mlp):
    proto, twin = helper_mlp
    g, f = load_onnx(proto), trace(twin, (torch.randn(2, 64),))
    assert g.ir == "onnx" and f.ir == "fx"
    assert [(g.op_type(n), g.is_linear(n), g.weight_layout(n)) for n in g.nodes()] == \
        [("Gemm", True, "nk"), ("Relu", False, None), ("MatMul", True, "nk")]
    assert [(f.op_type(n), f.is_linear(n), f.weight_layout(n)) for n in f.nodes()] == \
        [("Gemm", True, "nk"), ("Relu", False, None), ("Gemm", True, "nk")]
    gemm = g.nodes()[0]
    assert g.attribute(gemm, "transB") == 1 and g.attribute(gemm, "alpha") == 1.0  # alpha: the schema default
    assert g.attribute(gemm, "no_such", "d") == "d"
    assert f.attribute(f.nodes()[0], "transB") == 1


def test_bcq3_lowering_pipeline_on_onnx_matches_the_torch_path(helper_mlp, tmp_path):
    """Was: AttributeError: 'Node' object has no attribute 'op' in lower-bcq (qgraph.lowering.weight_layout)."""
    proto, twin = helper_mlp
    calib = [torch.randn(8, 64) for _ in range(3)]
    x = torch.randn(5, 64)
    q_onnx = qgraph.quantize(load_onnx(proto), calib=calib, progress=False, pipeline=BCQ3)
    q_torch = qgraph.quantize(twin, (x,), calib=calib, progress=False, pipeline=BCQ3)
    assert q_onnx.report["stats"]["lower-bcq"] == q_torch.report["stats"]["lower-bcq"] == {"lowered": 2}
    assert [(n.domain, n.op_type, n.name) for n in q_onnx.graph.nodes()] == \
        [("ai.qgraph", "BiQGEMM", "fc1"), ("", "Relu", "act"), ("ai.qgraph", "BiQGEMM", "fc2")]
    assert q_onnx.report["stats"]["verify"]["output_rel_err"] <= 1e-5
    assert rel_err(q_onnx(x), q_torch(x)) <= 1e-5
    # the lowered graph is the exporter's file: it passes the checker and runs in a fresh onnxruntime session
    path = q_onnx.graph.save(tmp_path / "mlp-bcq3.onnx")
    onnx.checker.check_model(str(path))
    from qgraph.export.parity import run_onnx, session

    y = run_onnx(session(path), (x,))[0]
    assert rel_err(torch.from_numpy(y), q_torch(x)) <= 1e-5


def test_bcq3_lowering_of_a_torch_exported_gemm_mlp(tmp_path):
    model = _mlp()
    x = torch.randn(4, 64)
    path = _exported(model, x, tmp_path / "mlp.onnx")
    g = load_onnx(path)
    linears = [n for n in g.nodes() if g.is_linear(n)]
    assert [g.op_type(n) for n in linears] == ["Gemm"] * 3
    calib = [torch.randn(8, 64) for _ in range(2)]
    q_onnx = qgraph.quantize(g, calib=calib, progress=False, pipeline=BCQ3)
    q_torch = qgraph.quantize(model, (x,), calib=calib, progress=False, pipeline=BCQ3)
    assert q_onnx.report["stats"]["lower-bcq"] == q_torch.report["stats"]["lower-bcq"] == {"lowered": 3}
    assert rel_err(q_onnx(x), q_torch(x)) <= 1e-5


@pytest.mark.parametrize("pipe", ["annotate{scheme=bcq,bits=3,group_size=32},gptq,insert-fq",
                                  "annotate{bits=4,act_bits=0},gptq,insert-fq",
                                  "annotate{bits=4,act_bits=0},gptq{sequential=false},insert-fq"])
def test_gptq_on_onnx_quantizes_every_weight_bearing_gemm_and_matmul(helper_mlp, pipe):
    """Was: {'gptq': 0, 'rtn': 2} on ONNX (gptq read fx's node.op / node.target)."""
    proto, twin = helper_mlp
    calib = [torch.randn(8, 64) for _ in range(3)]
    x = torch.randn(5, 64)
    g = load_onnx(proto)
    weighted = sum(1 for n in g.nodes() if g.op_type(n) in ("Gemm", "MatMul") and g.param(n, "weight") is not None)
    q_onnx = qgraph.quantize(g, calib=calib, progress=False, pipeline=pipe)
    q_torch = qgraph.quantize(twin, (x,), calib=calib, progress=False, pipeline=pipe)
    stats = q_onnx.report["stats"]["gptq"]
    assert (stats["gptq"], stats["rtn"]) == (weighted, 0) == (2, 0)
    assert stats == q_torch.report["stats"]["gptq"]
    assert rel_err(q_onnx(x), q_torch(x)) <= 1e-4
    # the float weights are back in the graph: the quantized ones live in the meta until insert-fq
    rows = q_onnx.report["layers"]
    assert [r["method"] for r in rows] == ["gptq", "gptq"]


def test_smooth_quant_runs_on_onnx_with_the_torch_statistics(helper_mlp):
    proto, twin = helper_mlp
    calib = [torch.randn(8, 64) * torch.linspace(0.1, 8, 64) for _ in range(3)]
    x = calib[0][:5]
    pipe = "annotate{act_bits=8},smooth-quant,calibrate,quantize-weights,insert-fq"
    q_onnx = qgraph.quantize(load_onnx(proto), calib=calib, progress=False, pipeline=pipe)
    q_torch = qgraph.quantize(twin, (x,), calib=calib, progress=False, pipeline=pipe)
    stats = q_onnx.report["stats"]["smooth-quant"]
    assert stats == q_torch.report["stats"]["smooth-quant"] and (stats["smoothed"], stats["groups"]) == (2, 2)
    assert sum(n.op_type == "Mul" for n in q_onnx.graph.nodes()) == 2
    assert rel_err(q_onnx(x), q_torch(x)) <= 1e-4


@pytest.mark.parametrize("name", ["adaround", "brecq", "aespa", "clip-search"])
def test_torch_only_passes_are_refused_on_onnx_before_anything_runs(helper_mlp, name):
    proto, _ = helper_mlp
    g = load_onnx(proto)
    with pytest.raises(PipelineError, match=f"pass '{name}' runs on torch.fx graphs only \\(.+\\), and this is an "
                                            f"ONNX graph; quantize the torch model instead of its ONNX export, or "
                                            f"drop '{name}' from the pipeline"):
        PassManager(f"annotate{{bits=4,act_bits=0}},{name}").run(g, PassContext(calibration=[torch.randn(4, 64)]))
    assert not any(g.meta(n) for n in g.nodes())  # annotate did not run either


def test_sparq_is_refused_on_onnx():
    g = load_onnx(_mlp_proto())
    with pytest.raises(PipelineError, match="pass 'sparq' runs on torch.fx graphs only"):
        PassManager("annotate{act_bits=8},calibrate,insert-fq,sparq").run(g, PassContext())


@pytest.mark.parametrize("opts", ["act_bits=8", "act_bits=7"])
def test_w8a8_lowering_pipeline_on_onnx_stores_int8_weights_and_matches_the_torch_path(helper_mlp, opts, tmp_path):
    """lower-int8 on ONNX: weights become int8 codes + DequantizeLinear after the activation Q/DQ (was: kept float,
    'cannot run the int8_gemm kernel'); onnxruntime fuses the 8-bit case into its int8 kernels (QGemm /
    MatMulIntegerToFloat). Outputs equal the Q/DQ simulation and the torch path's oneDNN kernels within 1e-5."""
    proto, twin = helper_mlp
    calib = [torch.randn(8, 64) for _ in range(2)]
    x = calib[1][:5]  # inside the calibrated range: beyond it ONNX saturates 7-bit codes at 8 bits (documented)
    pipe = lowering_pipeline(opts)
    q = qgraph.quantize(load_onnx(proto), calib=calib, progress=False, pipeline=pipe)
    q_torch = qgraph.quantize(twin, (x,), calib=calib, progress=False, pipeline=pipe)
    assert q.report["stats"]["lower-int8"] == q_torch.report["stats"]["lower-int8"] == {"lowered": 2, "chained": 0}
    rows = q.report["lowering"]
    assert [(r["node"], r["kernel"], r["status"]) for r in rows] == [("fc1", "dequantize_linear", "lowered"),
                                                                     ("fc2", "dequantize_linear", "lowered")]
    sim = qgraph.quantize(load_onnx(proto), calib=calib, progress=False,
                          pipeline=f"annotate{{{opts}}},calibrate,quantize-weights,insert-fq")
    assert rel_err(q(x), sim(x)) <= 1e-6 and rel_err(q(x), q_torch(x)) <= 1e-5
    dq_inputs = [n.inputs[0].const_value.dtype for n in q.graph.nodes() if n.op_type == "DequantizeLinear"
                 and n.inputs[0].const_value is not None]
    # fc1's int8 weight, fc1's bias as int32 codes at s_x·s_w (what onnxruntime's QGemm takes), fc2's int8 weight
    assert [str(d) for d in dq_inputs] == ["INT8", "INT32", "INT8"]
    import onnxruntime as ort  # 7-bit activations are Q/DQ without a Clip too (int8 storage), so both cases fuse

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(q.graph.save(tmp_path / "w8a8.onnx")), so, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert ops & {"QGemm", "MatMulIntegerToFloat", "QLinearMatMul"} and not ops & {"Gemm", "MatMul"}


def test_shares_weight_on_both_adapters():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    f = trace(Tied().eval(), (torch.randn(2, 8),))
    assert [f.shares_weight(n) for n in f.nodes() if f.op_type(n) == "Gemm"] == [True, True]
    from onnx import TensorProto, helper

    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="a"), helper.make_node("Relu", ["h"], ["r"], name="r"),
             helper.make_node("MatMul", ["r", "w"], ["y"], name="b")]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
                              initializer=[onnx.numpy_helper.from_array(w, "w")])
    g = load_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [g.shares_weight(n) for n in g.nodes()] == [True, False, True]
    assert [g.shares_weight(n) for n in load_onnx(_mlp_proto()).nodes()] == [False, False, False]


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("opts", ["bits=4,group_size=32,act_bits=0", "bits=4,act_bits=0", "bits=8,act_bits=0",
                                  "bits=3,group_size=64,act_bits=0"])
def test_weight_only_lowering_on_onnx_matches_the_torch_path(opts, opset, tmp_path):
    """lower-weight-only on ONNX: each weight becomes integer codes + DequantizeLinear (the exporter's form) instead
    of staying float; outputs equal the torch kernels' (int8pack / int4pack) within 1e-5 relative."""
    proto = _mlp_proto(k=64, h=64, n=32, opset=opset)
    twin = _twin(proto)
    calib = [torch.randn(8, 64) for _ in range(2)]
    x = torch.randn(5, 64)
    pipe = lowering_pipeline(opts)
    q_onnx = qgraph.quantize(load_onnx(proto), calib=calib, progress=False, pipeline=pipe)
    q_torch = qgraph.quantize(twin, (x,), calib=calib, progress=False, pipeline=pipe)
    stats_onnx, stats_torch = q_onnx.report["stats"]["lower-weight-only"], q_torch.report["stats"]["lower-weight-only"]
    assert stats_onnx["dequantize_linear"] == 2 and sum(stats_torch.values()) == 2
    assert [(r["node"], r["status"]) for r in q_onnx.report["lowering"]] == [("fc1", "lowered"), ("fc2", "lowered")]
    assert rel_err(q_onnx(x), q_torch(x)) <= 1e-5
    assert q_onnx.report["stats"]["verify"]["output_rel_err"] <= 1e-5
    g = q_onnx.graph
    weights = {v.name: v.const_value.dtype for v in g.model.graph.initializers.values() if v.const_value.size >= 2048}
    assert weights and all(str(d) in ("INT8", "UINT8", "INT4", "UINT4") for d in weights.values()), weights
    n_dq = sum(n.op_type == "DequantizeLinear" for n in g.nodes())
    assert n_dq == 2 and g.weights_to_qdq() == [] and sum(n.op_type == "DequantizeLinear" for n in g.nodes()) == n_dq
    path = g.save(tmp_path / "mlp-wo.onnx")
    onnx.checker.check_model(str(path))
    from qgraph.export.parity import run_onnx, session

    y = run_onnx(session(path), (x,))[0]
    assert rel_err(torch.from_numpy(y), q_torch(x)) <= 1e-5


@pytest.mark.parametrize("opset", [17, 21])
def test_weights_to_qdq_stores_group_wise_weights_at_every_opset(opset):
    """weights_to_qdq writes what dequantize_linear writes; group-wise weights below opset 21 were left float."""
    proto = _mlp_proto(k=64, h=64, n=32, opset=opset)
    x = torch.randn(5, 64)
    q = qgraph.quantize(load_onnx(proto), progress=False,
                        pipeline="annotate{bits=4,group_size=32,act_bits=0},quantize-weights,insert-fq")
    before = q(x)
    assert q.graph.weights_to_qdq() == []
    assert rel_err(q(x), before) <= 1e-6
    dtypes = {str(v.const_value.dtype) for v in q.graph.model.graph.initializers.values() if v.const_value.size >= 2048}
    assert dtypes == ({"INT4", "UINT4"} & dtypes or {"INT8", "UINT8"} & dtypes) and "FLOAT" not in dtypes
