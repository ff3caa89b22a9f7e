"""Bad inputs, corrupt quantized models and graphs the exporter cannot express raise ExportError with a message
that says what to do."""
import dataclasses

import pytest
import torch
from torch import nn

import qgraph
from qgraph.errors import ExportError
from qgraph.export import export_onnx, load_metadata, ort_ops
from qgraph.export.parity import run_onnx


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return MLP().eval(), torch.randn(3, 16)


def _quantize(model, x, pipeline):
    return qgraph.quantize(model, (x,), progress=False, pipeline=pipeline)


W8A8 = "annotate{act_bits=8},calibrate,quantize-weights,insert-fq"
BCQ = "annotate{scheme=bcq,bits=2,group_size=16},quantize-weights,insert-fq,lower-bcq"


def test_bad_arguments(mlp, tmp_path):
    model, x = mlp
    q = _quantize(model, x, W8A8)
    with pytest.raises(ExportError, match="QuantizedModel"):
        export_onnx(model, tmp_path / "m.onnx", (x,))
    with pytest.raises(ExportError, match="tuple of tensors"):
        export_onnx(q, tmp_path / "m.onnx", ([1, 2],))
    with pytest.raises(ExportError, match="opset must be in 18..23"):
        export_onnx(q, tmp_path / "m.onnx", (x,), opset=13)
    with pytest.raises(ExportError, match="mu .* must be 4 or 8"):
        export_onnx(q, tmp_path / "m.onnx", (x,), mu=5)
    with pytest.raises(ExportError, match="does not exist; create it first"):
        export_onnx(q, tmp_path / "missing" / "m.onnx", (x,))
    with pytest.raises(ExportError, match="runs on example_inputs"):
        export_onnx(q, tmp_path / "m.onnx", (torch.randn(3, 7),))


def test_quantized_weights_without_insert_fq(mlp, tmp_path):
    model, x = mlp
    q = _quantize(model, x, "annotate{act_bits=8},calibrate,quantize-weights")
    with pytest.raises(ExportError, match="add 'insert-fq'"):
        export_onnx(q, tmp_path / "m.onnx", (x,))


def _corrupt(q, fn):
    """Apply ``fn`` to the quantized weight of the first quantized node of the graph the export reads."""
    graph = q.artifacts.get("simulation", q.graph)
    node = next(n for n in graph.nodes() if "qgraph.qweight" in graph.meta(n))
    graph.meta(node)["qgraph.qweight"] = fn(graph.meta(node)["qgraph.qweight"])


def test_corrupt_uniform_weights(mlp, tmp_path):
    model, x = mlp
    q = _quantize(model, x, W8A8)
    _corrupt(q, lambda w: dataclasses.replace(w, scale=w.scale * float("nan")))
    with pytest.raises(ExportError, match="scales must be finite and > 0"):
        export_onnx(q, tmp_path / "m.onnx", (x,))
    q = _quantize(model, x, "annotate{bits=4,act_bits=8},calibrate,quantize-weights,insert-fq")
    _corrupt(q, lambda w: dataclasses.replace(w, codes=w.codes * 4))
    with pytest.raises(ExportError, match=r"weight codes outside \[-8, 7\].*re-run quantize-weights"):
        export_onnx(q, tmp_path / "m.onnx", (x,))


def test_corrupt_bcq_weights(mlp, tmp_path):
    model, x = mlp
    q = _quantize(model, x, BCQ)

    def nan_alpha(w):
        alpha = w.alpha.clone()
        alpha[0, 0, 0] = float("nan")
        return dataclasses.replace(w, alpha=alpha)

    _corrupt(q, nan_alpha)
    with pytest.raises(ExportError, match="non-finite"):
        export_onnx(q, tmp_path / "m.onnx", (x,))


def test_op_without_onnx_translation(tmp_path):
    @torch.library.custom_op("qgraph_test_export::mystery", mutates_args=())
    def mystery(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @mystery.register_fake
    def _(x):
        return torch.empty_like(x)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return torch.ops.qgraph_test_export.mystery(self.fc(x))

    x = torch.randn(2, 8)
    q = qgraph.quantize(Odd().eval(), (x,), frontend="export", progress=False, pipeline=W8A8)
    with pytest.raises(ExportError, match="without an ONNX translation"):
        export_onnx(q, tmp_path / "m.onnx", (x,))


def test_unreadable_files_and_wrong_inputs(mlp, tmp_path):
    model, x = mlp
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ExportError, match="not a readable ONNX file"):
        load_metadata(bad)
    info = export_onnx(_quantize(model, x, W8A8), tmp_path / "m.onnx", (x,))
    with pytest.raises(ExportError, match="takes 1 inputs"):
        run_onnx(info.path, (x, x))


def test_custom_op_needs_onnxruntime_extensions(monkeypatch):
    monkeypatch.setattr(ort_ops, "available", lambda: False)
    with pytest.raises(ExportError, match="onnxruntime-extensions.*portable=True"):
        ort_ops.session_options()
    assert ort_ops.session_options(custom_ops=False) is not None
