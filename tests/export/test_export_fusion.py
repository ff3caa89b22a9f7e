"""Exported QDQ that onnxruntime fuses into its int8 kernels: 7-bit activations without a Clip, int32 biases,
scalar activation qparams; the ONNX frontend on x86-avx2 keeps 7-bit activations."""
import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import qgraph
from qgraph.export import export_onnx
from qgraph.export.ort_ops import needs_precise_int8
from qgraph.export.parity import layerwise, run_onnx
from qgraph.export.runtime import OrtModel
from tests.conftest import rel_err

ort = pytest.importorskip("onnxruntime")


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c3 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = nn.functional.relu6(self.c1(x))
        x = nn.functional.relu6(self.c2(x))
        return self.fc(self.c3(x).flatten(1))


@pytest.fixture(scope="module", params=[7, 8])
def exported(request, tmp_path_factory):
    torch.manual_seed(0)
    model = ConvNet().eval()
    calib = [(torch.randn(4, 3, 8, 8),) for _ in range(3)]
    q = qgraph.quantize(model, calib[0], calib=calib, progress=False,
                        pipeline=f"fold-bn,dce,fuse-activation,annotate{{act_bits={request.param}}},calibrate,"
                                 f"quantize-weights,insert-fq")
    path = tmp_path_factory.mktemp("fuse") / "m.onnx"
    info = export_onnx(q, path, calib[0])
    return request.param, model, q, calib, path, info


def test_int8_activations_fuse_in_onnxruntime_and_match_the_simulation(exported):
    act_bits, model, q, calib, path, info = exported
    proto = onnx.load(path)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["Clip"] == 2  # only the two ReLU6s: the 7-bit ranges have none
    assert info.counts["onnx:Int32Bias"] == 4  # three convs and the classifier's Gemm
    inits = {t.name: t for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "QuantizeLinear":  # scalar uint8 qparams: onnxruntime's QDQ fusions need both
            assert list(inits[n.input[1]].dims) == [] and inits[n.input[2]].data_type == onnx.TensorProto.UINT8
    fused = OrtModel(path, threads=1)
    # 8 bits: every conv is a QLinearConv (ReLU6's Clip is dropped as the Q's range lies inside [0, 6]); 7 bits:
    # the 8-bit storage range reaches past 6, so onnxruntime keeps Conv+ReLU6 in float and fuses the last conv
    assert fused.optimized_ops["QLinearConv"] == (3 if act_bits == 8 else 1), fused.optimized_ops
    assert fused.optimized_ops["QGemm"] == 1, fused.optimized_ops
    # onnxruntime vs the simulation on the calibration data (inside every calibrated range): the int8 kernels
    # requantize in integer arithmetic, so a value may land one step off; nothing else differs.
    x = calib[0]
    layers = layerwise(q, path, x)
    assert layers["first_divergent"] is None, layers
    assert max(r["frac_beyond_range"] for r in layers["layers"]) <= 0.01
    with torch.no_grad():
        sim = q.graph.gm(*x)
    got = torch.from_numpy(run_onnx(path, x)[0])
    assert rel_err(got, sim) <= 0.05


def test_seven_bit_range_saturates_at_eight_bits_beyond_the_calibrated_range(exported):
    """The documented difference of the Clip-free form: a value beyond the 7-bit range saturates at 8 bits."""
    act_bits, model, q, calib, path, info = exported
    proto = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    first = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    s, z = float(inits[first.input[1]]), int(inits[first.input[2]])
    fq = next(n for n in q.graph.gm.graph.nodes if n.target is torch.fake_quantize_per_tensor_affine)
    qmin, qmax = fq.args[3], fq.args[4]
    assert qmax - qmin == (1 << act_bits) - 1 and z - 128 == fq.args[2] and s == pytest.approx(fq.args[1])
    sess = ort.InferenceSession(_first_qdq(proto).SerializeToString(), providers=["CPUExecutionProvider"])
    top = (qmax - fq.args[2]) * s
    x = np.array([top * 0.5, top, top + 3 * s, 1e6], np.float32)
    y = sess.run(None, {"x": x})[0]
    assert y[0] == pytest.approx(np.round(top * 0.5 / s) * s) and y[1] == pytest.approx(top)
    if act_bits == 7:
        assert y[2] == pytest.approx(top + 3 * s)  # the simulation clips this to `top`
    assert y[3] == pytest.approx((255 - z) * s)  # 8-bit storage saturation


def _first_qdq(proto: onnx.ModelProto) -> onnx.ModelProto:
    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    inits = [t for t in proto.graph.initializer if t.name in (*q.input[1:], *dq.input[1:])]
    qn = onnx.helper.make_node("QuantizeLinear", ["x", *q.input[1:]], ["q"])
    dqn = onnx.helper.make_node("DequantizeLinear", ["q", *dq.input[1:]], ["y"])
    g = onnx.helper.make_graph([qn, dqn], "qdq", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])], inits)
    return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21)])


def test_int32_bias_is_within_half_a_step(exported):
    act_bits, model, q, calib, path, info = exported
    proto = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    biases = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and inits[n.input[0]].dtype == np.int32]
    assert len(biases) == 4
    float_biases = [model.c1.bias, model.c2.bias, model.c3.bias, model.fc.bias]
    for n, b in zip(biases, float_biases):
        codes, scale = inits[n.input[0]].astype(np.float64), inits[n.input[1]].astype(np.float64)
        err = np.abs(codes * scale - b.detach().numpy())
        assert np.all(err <= scale / 2 * (1 + 1e-6)), n.name


def test_onnx_model_on_x86_avx2_keeps_7_bit_activations():
    """An ONNX model quantized for x86-avx2 gets the target's 7-bit activations (scales twice the 8-bit ones
    over the same calibrated ranges), without a Clip."""
    from qgraph.ir.onnx import load_onnx
    from tests.ir.test_onnx_adapter import _mlp_proto

    calib = [torch.randn(8, 16) for _ in range(3)]
    scales = {}
    for label, pipeline in (("target", None), ("a8", "annotate{act_bits=8},calibrate,quantize-weights,insert-fq")):
        kw = {"pipeline": pipeline} if pipeline else {}
        q = qgraph.quantize(load_onnx(_mlp_proto()), calib=calib, progress=False, target="x86-avx2", **kw)
        model = q.graph.model
        ops = collections.Counter(n.op_type for n in model.graph)
        assert ops["QuantizeLinear"] == 2 and ops["Clip"] == 0, ops
        scales[label] = [float(n.inputs[1].const_value.numpy()) for n in model.graph if n.op_type == "QuantizeLinear"]
    for s7, s8 in zip(scales["target"], scales["a8"]):
        assert s7 / s8 == pytest.approx(255 / 127, rel=0.02)


@pytest.mark.parametrize("flags,want", [("avx2 fma", True), ("avx2 avx512_vnni", False), ("avx2 avx_vnni", False),
                                        ("sse4_2", False)])
def test_precise_int8_only_without_vnni(flags, want):
    assert needs_precise_int8(f"processor\t: 0\nflags\t\t: fpu {flags}\n") is want


@pytest.mark.parametrize("rows", [(3,), (2, 3)])
def test_weight_only_int4_runs_as_matmulnbits(tmp_path, rows):
    """Group-wise 4-bit weights (power-of-two groups >= 16) run as onnxruntime's MatMulNBits, 2-D (Gemm) and
    3-D (MatMul) inputs alike, and match the simulation (accuracy level 1: fp32 activations)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    x = torch.randn(*rows, 128)
    q = qgraph.quantize(model, (x,), progress=False, pipeline=(
        "annotate{bits=4,granularity=group,group_size=32,act_bits=0},quantize-weights,insert-fq"))
    export_onnx(q, tmp_path / "m.onnx", (x,))
    sess = OrtModel(tmp_path / "m.onnx", threads=1)
    assert sess.optimized_ops["MatMulNBits"] == 2 and sess.unfused_qdq_ops == 0, sess.optimized_ops
    with torch.no_grad():
        assert rel_err(sess(x), q.graph.gm(x)) <= 1e-5


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        h = self.c0(x)
        return self.c2(nn.functional.relu6(self.c1(h)) + h)


def test_quantized_residuals_let_the_residual_producing_conv_fuse(tmp_path):
    """``quantized_residuals``: the residual Add reads c0's Q/DQ'd output, so c0 becomes a QLinearConv too."""
    torch.manual_seed(0)
    model = ResNet().eval()
    calib = [(torch.randn(2, 3, 8, 8),) for _ in range(2)]
    q = qgraph.quantize(model, calib[0], calib=calib, progress=False,
                        pipeline="annotate{act_bits=8},calibrate,quantize-weights,insert-fq")
    counts, outs = {}, {}
    for flag in (False, True):
        path = tmp_path / f"m{flag}.onnx"
        export_onnx(q, path, calib[0], quantized_residuals=flag)
        counts[flag] = OrtModel(path, threads=1).optimized_ops["QLinearConv"]
        outs[flag] = torch.from_numpy(run_onnx(path, calib[0])[0])
    assert counts[True] == counts[False] + 1, counts
    with torch.no_grad():
        sim = q.graph.gm(*calib[0])
    assert rel_err(outs[False], sim) <= 0.02 and rel_err(outs[True], sim) <= 0.05


def test_the_onnxruntime_route_quantizes_residual_inputs_by_default(tmp_path):
    """`onnxruntime_model` (what ``qgraph lower --runtime onnxruntime`` runs) exports with quantized residuals."""
    from qgraph.export.runtime import onnxruntime_model

    torch.manual_seed(0)
    calib = [(torch.randn(2, 3, 8, 8),) for _ in range(2)]
    q = qgraph.quantize(ResNet().eval(), calib[0], calib=calib, progress=False,
                        pipeline="annotate{act_bits=8},calibrate,quantize-weights,insert-fq")
    route = onnxruntime_model(q, calib[0], tmp_path / "route.onnx", threads=1)
    plain = onnxruntime_model(q, calib[0], tmp_path / "plain.onnx", threads=1, quantized_residuals=False)
    assert route.optimized_ops["QLinearConv"] == plain.optimized_ops["QLinearConv"] + 1, route.optimized_ops


def test_residual_outputs_make_every_conv_an_int8_kernel(tmp_path):
    """annotate{residual_outputs}: the residual block's last conv has a quantized output, so onnxruntime runs it as
    a QLinearConv (without it that conv stays a float FusedConv with Q/DQ and Transposes around it), within
    quantization noise of the simulation. The stem stays float either way: its ReLU6 output also feeds the
    residual Add unquantized."""
    from qgraph.export.runtime import onnxruntime_model
    from tests.passes.test_residual_outputs import Block

    torch.manual_seed(0)
    calib = [(torch.randn(2, 3, 6, 6),) for _ in range(3)]
    ops, err = {}, {}
    for flag in ("false", "true"):
        q = qgraph.quantize(Block().eval(), calib[0], calib=calib, progress=False,
                            pipeline=f"fold-bn,dce,fuse-activation,annotate{{act_bits=8,residual_outputs={flag}}},"
                                     f"calibrate,quantize-weights,insert-fq,lower-int8")
        route = onnxruntime_model(q, calib[0], tmp_path / f"r{flag}.onnx", threads=1)
        ops[flag] = route.optimized_ops
        with torch.no_grad():
            err[flag] = rel_err(route(calib[1][0]), q(calib[1][0]))
    assert (ops["false"]["QLinearConv"], ops["false"]["FusedConv"]) == (3, 2), ops["false"]
    assert (ops["true"]["QLinearConv"], ops["true"]["FusedConv"]) == (4, 1), ops["true"]
    assert err["true"] <= 0.05, err
