"""The ONNX adapter: the shared passes run on an .onnx model; corrupt or unsupported files get typed errors."""
import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from torch import nn

import qgraph
from qgraph import ExportError
from qgraph.ir.onnx import OnnxGraph, load_onnx
from tests.conftest import rel_err

FUZZ_COUNT = {"n": 0}


def _mlp_proto(k=16, h=24, n=4, opset=17, trans_b=True) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((h, k) if trans_b else (k, h)).astype(np.float32)
    w2 = rng.standard_normal((h, n)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1 if trans_b else 0),
        helper.make_node("Relu", ["h"], ["r"], name="act"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        initializer=[onnx.numpy_helper.from_array(w1, "w1"),
                     onnx.numpy_helper.from_array(rng.standard_normal(h).astype(np.float32), "b1"),
                     onnx.numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _torch_twin(proto: onnx.ModelProto) -> nn.Module:
    inits = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in proto.graph.initializer}
    trans_b = proto.graph.node[0].attribute[0].i
    m = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4, bias=False)).eval()
    with torch.no_grad():
        m[0].weight.copy_(inits["w1"] if trans_b else inits["w1"].T)
        m[0].bias.copy_(inits["b1"])
        m[2].weight.copy_(inits["w2"].T)
    return m


@pytest.mark.parametrize("trans_b", [True, False])
def test_onnx_model_through_the_shared_passes_matches_the_torch_path(trans_b):
    proto = _mlp_proto(trans_b=trans_b)
    twin = _torch_twin(proto)
    x = torch.randn(5, 16)
    g = load_onnx(proto)
    assert [g.op_type(n) for n in g.nodes()] == ["Gemm", "Relu", "MatMul"]
    # weights are seen as [out, in] whatever the ONNX layout
    assert [tuple(g.param(n, "weight").shape) for n in g.nodes() if g.param(n, "weight") is not None] == \
        [(24, 16), (4, 24)]
    torch.testing.assert_close(g(x), twin(x), rtol=1e-5, atol=1e-5)
    calib = [torch.randn(8, 16) for _ in range(3)] + [x]
    for pipe in ["annotate{act_bits=8},calibrate,quantize-weights,insert-fq",
                 "annotate{act_bits=7},calibrate,quantize-weights,insert-fq",
                 "annotate{act_bits=4},calibrate,quantize-weights,insert-fq",
                 "annotate{scheme=bcq,bits=3,group_size=8},quantize-weights,insert-fq"]:
        q_onnx = qgraph.quantize(load_onnx(proto), calib=calib, progress=False, pipeline=pipe)
        q_torch = qgraph.quantize(twin, (x,), calib=calib, progress=False, pipeline=pipe)
        # 7-bit Q/DQ has no Clip in ONNX (onnxruntime fuses it), so beyond the calibrated ranges it saturates at
        # 8 bits: compared on inputs well inside them
        xin = x / 2 if "act_bits=7" in pipe else x
        assert rel_err(q_onnx(xin), q_torch(xin)) <= 1e-5, pipe


def test_check_target_and_dce_work_on_onnx():
    with pytest.raises(qgraph.TargetError, match="npu-int8 cannot run 2 annotated node"):
        qgraph.quantize(load_onnx(_mlp_proto()), progress=False, target="npu-int8",
                        pipeline="annotate{scheme=bcq,bits=2},check-target")
    proto = _mlp_proto()
    proto.graph.node.append(helper.make_node("Relu", ["h"], ["dead"], name="dead"))
    g = load_onnx(proto)
    assert qgraph.PassManager("dce").run(g).stats["dce"]["removed"] == 1


def test_calibration_data_of_wrong_shape_names_the_input():
    with pytest.raises(qgraph.CalibrationError, match="calibration input 'x' has shape \\[8, 15\\]"):
        qgraph.quantize(load_onnx(_mlp_proto()), (torch.randn(2, 16),), calib=[torch.randn(8, 15)], progress=False)


@pytest.mark.parametrize("opset", [6, 99])
def test_unsupported_opsets(opset):
    proto = _mlp_proto()
    proto.opset_import[0].version = opset
    with pytest.raises(ExportError, match=f"opset {opset} is unsupported"):
        load_onnx(proto)


@pytest.mark.parametrize("opset", [7, 12])
def test_opsets_7_to_12_are_upgraded(opset):
    from qgraph.ir.onnx import OpsetUpgradeWarning

    proto = _mlp_proto(opset=opset)
    with pytest.warns(OpsetUpgradeWarning, match=f"opset {opset} upgraded to 17"):
        g = load_onnx(proto)
    x = torch.randn(3, 16)
    torch.testing.assert_close(g(x), _torch_twin(proto)(x), rtol=1e-5, atol=1e-5)


def test_missing_initializer_and_dangling_input():
    proto = _mlp_proto()
    del proto.graph.initializer[2]
    with pytest.raises(ExportError, match="w2"):
        load_onnx(proto)
    proto = _mlp_proto()
    proto.graph.node[1].input[0] = "nowhere"
    with pytest.raises(ExportError, match="nowhere"):
        load_onnx(proto)


def test_missing_file(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        load_onnx(tmp_path / "none.onnx")


_VALID = _mlp_proto().SerializeToString()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.integers(0, len(_VALID) - 1).map(lambda n: ("truncate", n)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)),
                                        min_size=1, max_size=8)),
    st.binary(max_size=200).map(lambda b: ("random", b)),
))
def test_importer_fuzzing_gives_typed_errors_only(case):
    kind, arg = case
    data = bytearray(_VALID)
    if kind == "truncate":
        data = data[:arg]
    elif kind == "flip":
        for pos, byte in arg:
            data[pos] = byte
    else:
        data = bytearray(arg)
    FUZZ_COUNT["n"] += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            g = load_onnx(bytes(data))
        except ExportError:
            return
    assert isinstance(g, OnnxGraph)
    # a mutation that still loads must run, or fail with the typed error naming onnxruntime's reason
    try:
        assert g(torch.randn(2, 16)).shape[0] == 2
    except ExportError as e:
        assert "onnxruntime could not run" in str(e)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["node_op", "attr", "init_dims", "output_name", "input_elem"]), st.integers(0, 5))
def test_structured_mutations_of_valid_protos(mutation, i):
    proto = _mlp_proto()
    if mutation == "node_op":
        proto.graph.node[i % 3].op_type = ["Frobnicate", "Conv", "Softmax"][i % 3]
    elif mutation == "attr":
        proto.graph.node[0].attribute[0].i = 7 + i
    elif mutation == "init_dims":
        proto.graph.initializer[i % 3].dims[0] += 1
    elif mutation == "output_name":
        proto.graph.output[0].name = f"ghost{i}"
    else:
        proto.graph.input[0].type.tensor_type.elem_type = [TensorProto.STRING, TensorProto.INT8, 0][i % 3]
    buf = io.BytesIO(proto.SerializeToString())
    try:
        g = load_onnx(buf.getvalue())
        g(torch.randn(2, 16))
    except ExportError as e:  # the only exception type a caller ever sees
        assert str(e)


@pytest.mark.parametrize("node_name", ["fc1", "fc2"])
def test_wrap_output_quantizes_every_reader_and_keeps_the_graph_output_name(node_name):
    """`wrap_output` on an inner node (read by Relu) and on the node producing the graph output ``y``: the readers
    see the fake-quantized value, and the model's output keeps its name."""
    g = load_onnx(_mlp_proto())
    x = torch.randn(5, 16)
    values, _ = g.node_values((x,))
    node = next(n for n in g.nodes() if n.name == node_name)
    out = values[node_name]
    scale = float(out.abs().max()) / 100
    g.wrap_output(node, torch.fake_quantize_per_tensor_affine, (scale, 0, -128, 127))
    assert [v.name for v in g.model.graph.outputs] == ["y"]
    ref = _torch_twin(_mlp_proto())
    with torch.no_grad():
        h = torch.fake_quantize_per_tensor_affine(ref[0](x), scale, 0, -128, 127) if node_name == "fc1" else ref[0](x)
        y = ref[2](ref[1](h))
        if node_name == "fc2":
            y = torch.fake_quantize_per_tensor_affine(y, scale, 0, -128, 127)
    assert rel_err(g(x), y) <= 1e-5
