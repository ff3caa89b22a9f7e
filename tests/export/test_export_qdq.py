"""Uniform quantization as QDQ ONNX: integer weight initializers + DequantizeLinear, activations as
QuantizeLinear → DequantizeLinear, run by stock onnxruntime and compared with the torch simulation.

The parity contract for activation-quantized models is layer by layer (see `qgraph.export.parity.layerwise`):
with each quantized activation fed the simulation's own input, every Q/DQ output is within one quantization
step of the simulation's (only rounding ties flip) and the model output matches to 1e-5 relative.
"""
import numpy as np
import onnx
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qgraph
from qgraph.export import export_onnx
from qgraph.export.parity import layerwise, parity, run_onnx
from tests.conftest import rel_err

INT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


class Net(nn.Module):
    """Embedding → Linear → ReLU → Conv1d → Linear: Gather, Gemm and Conv in one graph."""

    def __init__(self, vocab=40, d=32, h=48):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, h)
        self.conv = nn.Conv1d(h, 16, 3, padding=1)
        self.head = nn.Linear(16, 8)

    def forward(self, ids):
        x = torch.relu(self.fc(self.emb(ids)))
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.head(x)


def _dq_weights(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    inits = {t.name: t for t in proto.graph.initializer}
    return {n.input[0]: inits[n.input[0]] for n in proto.graph.node  # int32: biases (see test_export_fusion)
            if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and inits[n.input[0]].data_type != onnx.TensorProto.INT32}


@settings(max_examples=4, deadline=None)
@given(st.sampled_from(["fx", "export"]), st.sampled_from([8, 4]), st.sampled_from(["tensor", "channel", "group"]),
       st.sampled_from([8, 7, 4]), st.integers(0, 1000))
def test_qdq_matches_the_simulation_layer_by_layer(tmp_path_factory, frontend, bits, granularity, act_bits, seed):
    torch.manual_seed(seed)
    model = Net().eval()
    ids = torch.randint(0, 40, (3, 6))
    calib = [(torch.randint(0, 40, (4, 6)),) for _ in range(2)]
    group = ",group_size=8" if granularity == "group" else ""
    pipeline = (f"annotate{{bits={bits},granularity={granularity}{group},act_bits={act_bits},embedding_bits=8}},"
                f"calibrate,quantize-weights,insert-fq")
    q = qgraph.quantize(model, (ids,), calib=calib, frontend=frontend, progress=False, pipeline=pipeline)
    path = tmp_path_factory.mktemp("qdq") / "m.onnx"
    info = export_onnx(q, path, (ids,))
    assert info.opset == 21 and not info.custom_ops
    assert info.counts["qdq-weight"] == 3 and info.counts["rowwise-gather"] == 1
    proto = onnx.load(path)
    weights = _dq_weights(proto)
    assert len(weights) == 3 and all(t.data_type in INT_TYPES for t in weights.values())
    want = onnx.TensorProto.INT4 if bits == 4 else onnx.TensorProto.INT8
    assert {t.data_type for t in weights.values()} == {want}
    assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) == 3
    if granularity == "group":  # with quantized activations: per-group arithmetic (see rewrite._group_arithmetic)
        assert sum(n.op_type == "Sub" for n in proto.graph.node) >= 3
    x = torch.randint(0, 40, (5, 6))
    layers = layerwise(q, path, (x,))
    assert layers["first_divergent"] is None, layers
    assert all(r["max_steps"] <= 1.0 + 1e-3 and r["frac_changed"] <= 0.01 for r in layers["layers"]), layers
    assert layers["output_rel_err"] <= 1e-5
    r = parity(model, q, path, (x,))
    assert set(r["rel_err"]) == {"fake_quant_vs_float", "onnxruntime_vs_fake_quant", "onnxruntime_vs_float"}


def test_weight_only_and_lowered_models_export_their_simulation(tmp_path):
    """Without activation specs only weights are Q/DQ'd; a lowered model exports its simulation snapshot."""
    torch.manual_seed(3)
    model = Net().eval()
    ids = torch.randint(0, 40, (2, 6))
    q = qgraph.quantize(model, (ids,), progress=False, pipeline=(
        "annotate{bits=4,granularity=group,group_size=16,act_bits=0,embedding_bits=4},quantize-weights,insert-fq,"
        "lower-embedding,dce"))
    assert "simulation" in q.artifacts
    info = export_onnx(q, tmp_path / "w.onnx", (ids,))
    proto = onnx.load(info.path)
    assert not any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    assert {"BitwiseAnd", "BitShift", "Gather"} <= {n.op_type for n in proto.graph.node}  # 4-bit rows
    x = torch.randint(0, 40, (3, 6))
    got = run_onnx(info.path, (x,))[0]
    with torch.no_grad():
        assert rel_err(torch.from_numpy(got), q(x)) <= 1e-5


def test_opset_18_stores_int8_codes_and_group_scales_as_arithmetic(tmp_path):
    torch.manual_seed(4)
    model = Net().eval()
    ids = torch.randint(0, 40, (2, 6))
    q = qgraph.quantize(model, (ids,), progress=False, pipeline=(
        "annotate{bits=4,granularity=group,group_size=8,act_bits=8},calibrate,quantize-weights,insert-fq"))
    info = export_onnx(q, tmp_path / "o18.onnx", (ids,), opset=18)
    proto = onnx.load(info.path)
    assert {o.version for o in proto.opset_import if o.domain == ""} == {18}
    assert {t.data_type for t in _dq_weights(proto).values()} == {onnx.TensorProto.INT8}
    assert not any(a.name == "block_size" for n in proto.graph.node for a in n.attribute)
    layers = layerwise(q, info.path, (torch.randint(0, 40, (3, 6)),))
    assert layers["first_divergent"] is None and layers["output_rel_err"] <= 1e-5


def test_external_data_on_request(tmp_path):
    torch.manual_seed(5)
    model = Net().eval()
    ids = torch.randint(0, 40, (2, 6))
    q = qgraph.quantize(model, (ids,), progress=False,
                        pipeline="annotate{act_bits=8},calibrate,quantize-weights,insert-fq")
    info = export_onnx(q, tmp_path / "ext.onnx", (ids,), external_data=True)
    assert info.data_path is not None and info.data_path.exists() and info.data_path.stat().st_size > 0
    assert info.bytes == info.path.stat().st_size + info.data_path.stat().st_size
    onnx.checker.check_model(str(info.path))
    meta = qgraph.export.load_metadata(info.path)
    assert meta["qgraph.portable"] == "false" and "insert-fq" in meta["qgraph.pipeline"]
    got = run_onnx(info.path, (ids,))[0]
    with torch.no_grad():
        want = q(ids).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
