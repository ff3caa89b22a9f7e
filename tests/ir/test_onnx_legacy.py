"""Older ONNX files as model zoos ship them: opsets 7–12 (upgraded on load with onnx.version_converter),
initializers also listed among the graph inputs, BatchNormalization after Conv, weights in Constant nodes."""
import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import ExportError
from qgraph.api import DEFAULT_PIPELINE, lowering_pipeline
from qgraph.ir.onnx import OpsetUpgradeWarning, load_onnx
from tests.conftest import rel_err


def _ort(proto: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.fixture(scope="module")
def digits():
    """The bundled digits CNN (conv-BN everywhere, a residual add) and the digits test / train images."""
    pytest.importorskip("sklearn")
    from qgraph.data.digits import digits_split
    from qgraph.models.digits_cnn import load_digits_cnn

    split = digits_split()
    return load_digits_cnn().eval(), split.x_test, [split.x_train[i:i + 64] for i in range(0, 256, 64)]


def _legacy_export(model, x, opset: int) -> onnx.ModelProto:
    """torch's TorchScript exporter in the old zoo convention: initializers kept among the graph inputs, BN
    not folded."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x[:2],), buf, dynamo=False, opset_version=opset, keep_initializers_as_inputs=True,
                          do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    proto = onnx.load_from_string(buf.getvalue())
    assert [o.version for o in proto.opset_import if o.domain == ""] == [opset]
    assert len(proto.graph.input) > 1 and {i.name for i in proto.graph.input} >= {t.name for t in proto.graph.initializer}
    return proto


@pytest.mark.parametrize("opset", [7, 9, 10, 11, 12])
def test_old_opsets_are_upgraded_and_quantize_like_onnxruntime_fp32(digits, opset):
    model, x, calib = digits
    proto = _legacy_export(model, x, opset)
    before = proto.SerializeToString()
    with pytest.warns(OpsetUpgradeWarning, match=f"opset {opset} upgraded to 17 with onnx.version_converter"):
        g = load_onnx(proto)
    assert proto.SerializeToString() == before  # the caller's model is left alone
    assert g.notes == [f"default-domain opset {opset} upgraded to 17 with onnx.version_converter"]
    assert g.model.opset_imports[""] == 17
    assert [v.name for v in g.input_nodes()] == ["x"]  # initializers are constants, not inputs to feed
    ref = _ort(proto, x).argmax(1)
    q = qgraph.quantize(g, calib=calib, progress=False, pipeline=DEFAULT_PIPELINE)
    assert q.report["stats"]["fold-bn"] == {"folded": 4}
    assert float((q(x).numpy().argmax(1) == ref).mean()) >= 0.95  # measured 1.0 at every opset


@pytest.mark.parametrize("opset", [7, 12])
def test_old_opsets_go_through_the_bcq_lowering_pipeline(digits, opset):
    model, x, calib = digits
    proto = _legacy_export(model, x, opset)
    ref = _ort(proto, x).argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OpsetUpgradeWarning)
        g = load_onnx(proto)
    # x86-avx2 has no BCQ conv kernel: check-target{fallback=true} keeps the convs float, the head is lowered
    q = qgraph.quantize(g, calib=calib, progress=False,
                        pipeline=lowering_pipeline("scheme=bcq,bits=3,group_size=32", fallback=True))
    assert q.report["stats"]["fold-bn"] == {"folded": 4}
    assert q.report["stats"]["lower-bcq"] == {"lowered": 1}
    assert float((q(x).numpy().argmax(1) == ref).mean()) >= 0.95  # measured 0.997


def test_w8a8_lowering_of_an_old_cnn_stores_int8_conv_weights(digits):
    """lower-int8 on ONNX convs too: int8 codes + per-channel DequantizeLinear for every Conv and the Gemm head,
    outputs close to the Q/DQ simulation, top-1 agreement with onnxruntime fp32 as the default pipeline's."""
    model, x, calib = digits
    proto = _legacy_export(model, x, 12)
    ref = _ort(proto, x).argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OpsetUpgradeWarning)
        g, sim_g = load_onnx(proto), load_onnx(proto)
    q = qgraph.quantize(g, calib=calib, progress=False, pipeline=lowering_pipeline("act_bits=8"))
    n_weighted = sum(g.op_type(n) in ("Conv", "Gemm", "MatMul") for n in q.graph.nodes())
    assert q.report["stats"]["lower-int8"]["lowered"] == n_weighted >= 4
    assert all(r["kernel"] == "dequantize_linear" for r in q.report["lowering"] if r["status"] == "lowered")
    sim = qgraph.quantize(sim_g, calib=calib, progress=False, pipeline=lowering_pipeline("act_bits=8").split(
        ",lower-")[0])
    # With int32 biases the lowered Convs fuse into onnxruntime's QLinearConv, which requantizes each output in
    # integer arithmetic: a value on a rounding tie can take the neighbouring code there (measured 4.6e-3).
    assert rel_err(q(x), sim(x)) <= 2e-2
    assert float((q(x).numpy().argmax(1) == sim(x).numpy().argmax(1)).mean()) >= 0.95
    assert float((q(x).numpy().argmax(1) == ref).mean()) >= 0.95


def _cnn_proto(opset: int, *, init_as_inputs: bool, const_weights: tuple[str, ...] = ()) -> onnx.ModelProto:
    """Conv-BN-Relu-MaxPool-Conv-BN-Relu-GAP-Flatten-Gemm built with onnx.helper; ``const_weights`` are held by
    Constant nodes instead of initializers."""
    rng = np.random.default_rng(0)

    def t(name, *shape, scale=0.3, offset=0.0):
        return numpy_helper.from_array((offset + rng.standard_normal(shape) * scale).astype(np.float32), name)

    def bn(p, c):
        return [t(f"{p}_g", c, scale=0.2, offset=1.0), t(f"{p}_b", c, scale=0.1), t(f"{p}_m", c, scale=0.1),
                numpy_helper.from_array((0.5 + rng.random(c)).astype(np.float32), f"{p}_v")]

    inits = [t("c1_w", 8, 3, 3, 3), t("c1_bias", 8, scale=0.1), *bn("bn1", 8), t("c2_w", 16, 8, 3, 3, scale=0.15),
             *bn("bn2", 16), t("fc_w", 10, 16, scale=1.0), t("fc_b", 10, scale=0.01)]
    bn_attrs = {"epsilon": 1e-3} | ({"spatial": 1} if opset < 9 else {})
    consts = [helper.make_node("Constant", [], [i.name], value=i, name=f"{i.name}_const")
              for i in inits if i.name in const_weights]
    inits = [i for i in inits if i.name not in const_weights]
    nodes = consts + [
        helper.make_node("Conv", ["x", "c1_w", "c1_bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn1_g", "bn1_b", "bn1_m", "bn1_v"], ["b1"], name="bn1",
                         **bn_attrs),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2_w"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "bn2_g", "bn2_b", "bn2_m", "bn2_v"], ["b2"], name="bn2",
                         **bn_attrs),
        helper.make_node("Relu", ["b2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])]
    if init_as_inputs:
        inputs += [helper.make_tensor_value_info(i.name, TensorProto.FLOAT, list(i.dims)) for i in inits]
    graph = helper.make_graph(nodes, "cnn", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                    ["N", 10])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = {7: 3, 9: 4, 12: 7}.get(opset, 8)
    onnx.checker.check_model(proto)
    return proto


@pytest.mark.parametrize("opset", [9, 13])
def test_fold_bn_with_weights_in_constant_nodes(opset):
    """Was: AttributeError: 'NoneType' object has no attribute 'dim' in fold-bn (the Conv weight was a Constant
    node's output, which `param` did not see)."""
    proto = _cnn_proto(opset, init_as_inputs=False, const_weights=("c1_w", "c2_w", "bn2_m", "bn2_v"))
    x = torch.randn(16, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OpsetUpgradeWarning)
        g = load_onnx(proto)
    assert "Constant" not in [g.op_type(n) for n in g.nodes()]
    result = qgraph.PassManager("fold-bn").run(g)
    assert result.stats["fold-bn"] == {"folded": 2}
    assert [g.op_type(n) for n in g.nodes()][:4] == ["Conv", "Relu", "MaxPool", "Conv"]
    assert rel_err(g(x), torch.from_numpy(_ort(proto, x))) <= 1e-5


def test_initializers_among_inputs_at_opset_13_are_constants():
    """Was: "the ONNX model takes 4 inputs (x, c1_w, c1_bias, c2_w), got 1" after fold-bn replaced the conv
    weights (the old initializers stayed behind as graph inputs nobody fed)."""
    proto = _cnn_proto(13, init_as_inputs=True)
    g0 = torch.Generator().manual_seed(0)  # (was the global generator: the suite's order moved the agreement)
    x = torch.randn(32, 3, 16, 16, generator=g0) + 2 * torch.randn(32, 3, 1, 1, generator=g0)
    g = load_onnx(proto)
    assert [v.name for v in g.input_nodes()] == ["x"] and g.notes == []
    q = qgraph.quantize(g, calib=[x[:16]], progress=False, pipeline=DEFAULT_PIPELINE)
    assert q.report["stats"]["fold-bn"] == {"folded": 2}
    assert float((q(x).numpy().argmax(1) == _ort(proto, x).argmax(1)).mean()) >= 0.95


@pytest.mark.parametrize("opset", [5, 6, 24, 99])
def test_opsets_outside_the_upgradable_range_are_refused(opset):
    proto = _cnn_proto(13, init_as_inputs=False)
    proto.opset_import[0].version = opset
    with pytest.raises(ExportError, match=f"opset {opset} is unsupported; qgraph reads opsets 13..23 and upgrades "
                                          f"7..12"):
        load_onnx(proto)


def test_a_failed_upgrade_is_a_typed_error():
    proto = _cnn_proto(9, init_as_inputs=False)
    proto.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(ExportError, match="opset 9 could not be upgraded to 17 by onnx.version_converter"):
        load_onnx(proto)
