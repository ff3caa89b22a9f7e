"""Per-layer int8 vs float kernel times in onnxruntime, and the onnxruntime route's choice between them."""
import collections
import json

import onnx
import pytest
import torch

import qgraph
from qgraph.export.layer_latency import LayerLatency, compare_layers, float_twin, interleaved_ms
from qgraph.export.parity import run_onnx
from qgraph.export.runtime import OrtModel, onnxruntime_model
from tests.conftest import rel_err
from tests.passes.test_residual_outputs import Block

pytest.importorskip("onnxruntime")

PIPE = ("fold-bn,dce,fuse-activation,annotate{act_bits=8,residual_outputs=true},calibrate,quantize-weights,"
        "insert-fq,lower-int8")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = Block().eval()
    calib = [(torch.randn(2, 3, 6, 6),) for _ in range(3)]
    q = qgraph.quantize(model, calib[0], calib=calib, progress=False, pipeline=PIPE)
    path = tmp_path_factory.mktemp("ll") / "q.onnx"
    onnxruntime_model(q, calib[0], path, threads=1)
    return model, q, calib, path


def test_float_twin_has_no_qdq_and_runs_the_dequantized_weights(exported, tmp_path):
    model, q, calib, path = exported
    twin = float_twin(path, tmp_path / "twin.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(twin)).graph.node)
    assert not ops["QuantizeLinear"] and not ops["DequantizeLinear"] and ops["Conv"] == 5, ops
    # the weights are the quantized ones, the activations float: compare with a float run of those weights (the
    # file's biases are int32 codes at s_x·s_w, within 1e-4 of the float ones)
    weight_only = qgraph.quantize(model, calib[0], calib=calib, progress=False,
                                  pipeline="fold-bn,dce,fuse-activation,annotate{act_bits=0},quantize-weights,"
                                           "insert-fq")
    x = calib[1][0]
    out = torch.from_numpy(run_onnx(twin, (x,))[0])
    with torch.no_grad():
        assert rel_err(out, weight_only(x)) <= 1e-4


def test_every_int8_layer_is_timed_against_its_float_kernel(exported):
    _, _, calib, path = exported
    rows = compare_layers(path, calib[0], rounds=5, threads=1)
    by_layer = {r.layer: r for r in rows}
    # four convs and the classifier; the stem runs float in the QDQ file (its ReLU6 output also feeds the residual
    # Add unquantized) so it has no int8 kernel to compare
    assert sorted(by_layer) == ["dw", "expand", "fc", "head", "project"], sorted(by_layer)
    assert {r.int8_op for r in rows} <= {"QLinearConv", "QGemm"} and by_layer["fc"].int8_op == "QGemm"
    assert {r.float_op for r in rows} <= {"Conv", "FusedConv", "Gemm", "FusedGemm"}, {r.float_op for r in rows}
    assert all(r.int8_us > 0 and r.float_us > 0 for r in rows)
    assert json.dumps([r.as_dict() for r in rows])


def test_layer_latency_rejects_negative_times():
    with pytest.raises(qgraph.QGraphError, match="must be >= 0"):
        LayerLatency("x", "QLinearConv", -1.0, "Conv", 1.0)


def test_interleaved_ms_times_each_model():
    calls = collections.Counter()

    def a(x):
        calls["a"] += 1
        return x

    def b(x):
        calls["b"] += 1
        return x

    ms = interleaved_ms([a, b], (torch.zeros(1),), rounds=4)
    assert len(ms) == 2 and all(m >= 0 for m in ms) and calls == {"a": 5, "b": 5}


@pytest.mark.parametrize("faster", ["float", "int8"])
def test_cli_keeps_a_slower_int8_layer_float_only_when_the_model_gets_faster(tmp_path, capsys, monkeypatch, faster):
    """The CLI's choice, with the measurements stubbed: 'expand' is slower in int8, so the route is requantized
    with expand float; that file is kept only when the whole model is faster with it."""
    import qgraph.export.layer_latency as ll
    from qgraph.cli import main

    monkeypatch.setattr(ll, "compare_layers", lambda path, inputs, **kw: [
        LayerLatency("expand", "QLinearConv", 50.0, "FusedConv", 20.0),
        LayerLatency("stem", "QLinearConv", 10.0, "FusedConv", 20.0)])
    monkeypatch.setattr(ll, "interleaved_ms", lambda models, inputs, **kw: [2.0, 1.0] if faster == "float"
                        else [1.0, 2.0])
    src = tmp_path / "net.py"
    src.write_text("import torch\nfrom tests.passes.test_residual_outputs import Block\n\ndef make():\n"
                   "    torch.manual_seed(0)\n    return Block().eval(), (torch.randn(2, 3, 6, 6),)\n")
    out = tmp_path / "o"
    code = main(["lower", f"{src}:make", "--act-bits", "8", "--out", str(out), "--runtime", "onnxruntime", "--quiet",
                 "--json", "--no-compile"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    choice = summary["onnxruntime"]["int8_layers"]
    assert choice["candidates"] == ["expand"]
    assert choice["kept_float"] == (["expand"] if faster == "float" else [])
    ops = OrtModel(out / "model.onnx", threads=1).optimized_ops
    assert ops["QLinearConv"] == (3 if faster == "float" else 4), ops
    report = (out / "report.md").read_text()
    assert "## onnxruntime: int8 or float per layer (measured)" in report and "| expand | QLinearConv | 50.0 |" in report
    assert not (out / "model-float-layers.onnx").exists()
