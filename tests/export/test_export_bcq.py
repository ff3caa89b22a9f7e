"""BCQ layers in ONNX: the ai.qgraph::BiQGEMM custom op (run by onnxruntime through qgraph's kernel) and its
portable standard-op form, each against the torch reference (≤ 1e-5 relative), for random shapes, bits,
group sizes (also ones not divisible by μ), offsets and biases; then whole lowered models end to end."""
import importlib.util

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qgraph
from qgraph.export import portable, prepare_onnx, schema, session_options
from qgraph.export.parity import parity, run_onnx
from qgraph.kernels.reference import biqgemm_reference
from qgraph.quant.bcq_weight import BCQWeight
from tests.conftest import rel_err

needs_extensions = pytest.mark.skipif(importlib.util.find_spec("onnxruntime_extensions") is None,
                                      reason="onnxruntime-extensions not installed")


def random_bcq(q, m, k, gs, offset, seed) -> BCQWeight:
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (q, m, k), generator=g) * 2 - 1
    groups = -(-k // gs)
    alpha = torch.rand(q, m, groups, generator=g) + 0.05
    z = torch.randn(m, groups, generator=g) * 0.1 if offset else None
    return BCQWeight.from_signs(signs, alpha, z, group_size=gs)


def single_op_model(build, k: int, m: int) -> bytes:
    """A model ``y = build(emitter, x)`` with x float [N, K] (N dynamic) and y float [N, M]."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["n", k]))
    graph = ir.Graph([x], [], nodes=[], name="g", opset_imports={"": 21, schema.DOMAIN: 1})
    e = portable.Emitter(graph, "w")
    y = build(e, x)
    graph.extend(e.nodes)
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["n", m])
    graph.outputs.append(y)
    proto = ir.to_proto(ir.Model(graph, ir_version=10))
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def run(model: bytes, x: np.ndarray, custom: bool) -> np.ndarray:
    import onnxruntime as ort

    so = session_options(custom_ops=custom)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


shapes = st.tuples(st.integers(1, 4), st.integers(1, 40), st.integers(1, 70)).flatmap(
    lambda qmk: st.tuples(st.just(qmk), st.integers(1, qmk[2])))


@settings(max_examples=40, deadline=None)
@given(shapes, st.booleans(), st.booleans(), st.sampled_from([4, 8]), st.integers(1, 5), st.integers(0, 10**6))
def test_portable_form_matches_reference(qmk_gs, offset, has_bias, mu, n, seed):
    (q, m, k), gs = qmk_gs
    w = random_bcq(q, m, k, gs, offset, seed)
    bias = torch.randn(m) if has_bias else None
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1))

    def build(e, xv):
        off = None if w.offset is None else w.offset.numpy()
        return portable.emit_biqgemm(e, xv, w.planes.numpy(), w.alpha.numpy(), off,
                                     None if bias is None else bias.numpy(), m, k, gs, mu)

    got = run(single_op_model(build, k, m), x.numpy(), custom=False)
    assert rel_err(torch.from_numpy(got), biqgemm_reference(x, w, bias)) <= 1e-5


@needs_extensions
@settings(max_examples=30, deadline=None)
@given(shapes, st.booleans(), st.booleans(), st.integers(1, 5), st.integers(0, 10**6))
def test_custom_op_matches_reference(qmk_gs, offset, has_bias, n, seed):
    (q, m, k), gs = qmk_gs
    w = random_bcq(q, m, k, gs, offset, seed)
    bias = torch.randn(m) if has_bias else None
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1))

    def build(e, xv):
        none = e.const("none", np.zeros(0, np.float32))
        ins = [xv, e.const("planes", w.planes.numpy()), e.const("alpha", w.alpha.numpy()),
               none if w.offset is None else e.const("z", w.offset.numpy()),
               none if bias is None else e.const("bias", bias.numpy())]
        return e.op("BiQGEMM", ins, domain=schema.DOMAIN, out_features=m, in_features=k, group_size=gs, bits=q)

    got = run(single_op_model(build, k, m), x.numpy(), custom=True)
    assert rel_err(torch.from_numpy(got), biqgemm_reference(x, w, bias)) <= 1e-5


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.sampled_from([8, 16, 24, 64]), st.integers(0, 1000))
def test_mu8_keys_are_the_packed_planes_when_groups_align(q, m, k, seed):
    w = random_bcq(q, m, k, min(k, 8), False, seed)
    keys = portable.keys_of(w.planes.numpy(), k, w.group_size, 8)
    np.testing.assert_array_equal(keys, w.planes.numpy())
    assert portable.sign_matrix(4).shape == (4, 16) and set(np.unique(portable.sign_matrix(8))) == {-1.0, 1.0}


class TinyLM(nn.Module):
    def __init__(self, vocab=60, d=64, h=96):
        super().__init__()
        self.emb, self.up, self.down = nn.Embedding(vocab, d), nn.Linear(d, h), nn.Linear(h, d, bias=False)

    def forward(self, ids):
        return self.down(torch.relu(self.up(self.emb(ids))))


PIPE = ("annotate{{scheme=bcq,bits={bits},group_size={group},offset={offset},embedding_bits={ebits}}},"
        "quantize-weights,insert-fq,lower-bcq,lower-embedding,dce")


@needs_extensions
@pytest.mark.parametrize("frontend,bits,group,offset,ebits", [("fx", 3, 32, False, 4), ("export", 2, 24, True, 8)])
def test_lowered_bcq_model_custom_and_portable(tmp_path, frontend, bits, group, offset, ebits):
    torch.manual_seed(0)
    model = TinyLM().eval()
    ids = torch.randint(0, 60, (3, 5))
    q = qgraph.quantize(model, (ids,), frontend=frontend, progress=False,
                        pipeline=PIPE.format(bits=bits, group=group, offset=str(offset).lower(), ebits=ebits))
    prepared = prepare_onnx(q, (ids,))
    custom = prepared.write(tmp_path / "custom.onnx")
    port = prepared.write(tmp_path / "portable.onnx", portable=True, mu=4)
    assert custom.custom_ops and not port.custom_ops
    assert custom.counts["biqgemm"] == 2 and custom.counts["rowwise-gather"] == 1
    proto = onnx.load(custom.path)
    assert sum(n.op_type == "BiQGEMM" and n.domain == "ai.qgraph" for n in proto.graph.node) == 2
    assert not any(n.domain for n in onnx.load(port.path).graph.node)
    # no float copy of a quantized weight: every float initializer is small (alpha, z, bias, scales)
    floats = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert max(int(np.prod(t.dims)) for t in floats) < 96 * 64 / 4
    ids2 = torch.randint(0, 60, (4, 5))
    for info in (custom, port):
        r = parity(model, q, info.path, (ids2,))
        assert r["rel_err"]["onnxruntime_vs_lowered"] <= 1e-5, r["table"]
        assert r["rel_err"]["lowered_vs_fake_quant"] <= 1e-5


def test_portable_runs_without_qgraph_ops(tmp_path):
    """A portable file holds only standard ops: a session without any custom op library runs it."""
    import onnxruntime as ort

    torch.manual_seed(1)
    model = TinyLM().eval()
    ids = torch.randint(0, 60, (2, 5))
    q = qgraph.quantize(model, (ids,), progress=False, pipeline=PIPE.format(bits=3, group=64, offset="false",
                                                                             ebits=4))
    info = qgraph.export.export_onnx(q, tmp_path / "p.onnx", (ids,), portable=True)
    sess = ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
    got = run_onnx(sess, (ids,))[0]
    with torch.no_grad():
        assert rel_err(torch.from_numpy(got), q(ids)) <= 1e-5
