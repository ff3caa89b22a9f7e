"""The onnxruntime route: a session-backed model from qgraph's export, with the optimized graph's op types."""
import json

import pytest
import torch
from torch import nn

import qgraph
from qgraph.errors import KernelError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_extensions")

from qgraph.export.runtime import onnxruntime_model  # noqa: E402


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval(), torch.randn(4, 32)


@pytest.mark.parametrize("options, tol", [("scheme=bcq,bits=3,group_size=32", 1e-5), ("", 2e-2)])
def test_session_model_matches_the_lowered_model(tmp_path, options, tol):
    model, x = _mlp()
    calib = [torch.randn(16, 32) for _ in range(4)]
    q = qgraph.quantize(model, (x,), target="x86-avx2", calib=calib, progress=False,
                        pipeline=qgraph.api.lowering_pipeline(options))
    m = onnxruntime_model(q, (torch.randn(8, 32),), tmp_path / "m.onnx")
    other = torch.randn(5, 32)
    y, ref = m(other), q(other)
    assert y.shape == ref.shape
    assert float((y - ref).abs().max() / ref.abs().max()) <= tol
    assert sum(m.optimized_ops.values()) > 0
    if "bcq" in options:
        assert m.optimized_ops["BiQGEMM"] == 2 and m.unfused_qdq_ops == 0
    summary = m.summary()
    assert summary["fused_int8_ops"] == m.fused_int8_ops and json.dumps(summary)


def test_session_model_rejects_bad_inputs(tmp_path):
    model, x = _mlp()
    q = qgraph.quantize(model, (x,), target="x86-avx2", progress=False,
                        pipeline=qgraph.api.lowering_pipeline("scheme=bcq,bits=3,group_size=32"))
    m = onnxruntime_model(q, (torch.randn(8, 32),), tmp_path / "m.onnx")
    with pytest.raises(KernelError, match="takes 1 inputs"):
        m(x, x)
    with pytest.raises(KernelError, match="must be torch.float32"):
        m(x.double())
    with pytest.raises(KernelError, match="must be a tensor"):
        m(x.numpy())
    wide = torch.randn(32, 4).T  # not contiguous: the session gets a contiguous copy
    assert not wide.is_contiguous()
    torch.testing.assert_close(m(wide), m(wide.contiguous()), rtol=0, atol=0)


def test_cli_lower_with_the_onnxruntime_runtime(tmp_path, capsys):
    from qgraph.cli import main

    src = tmp_path / "net.py"
    src.write_text("import torch, torch.nn as nn\n\ndef make():\n    torch.manual_seed(0)\n"
                   "    return nn.Sequential(nn.Linear(32, 16)).eval(), (torch.randn(4, 32),)\n")
    out = tmp_path / "o"
    code = main(["lower", f"{src}:make", "--scheme", "bcq", "--bits", "3", "--group-size", "32", "--out", str(out),
                 "--runtime", "onnxruntime", "--quiet", "--no-measure", "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and (out / "model.onnx").is_file()
    assert summary["onnxruntime"]["optimized_ops"]["BiQGEMM"] == 1


def test_cli_onnxruntime_route_is_timed_and_scored_in_the_report(tmp_path, capsys):
    from qgraph.cli import main

    src = tmp_path / "net.py"
    src.write_text("import torch, torch.nn as nn\n\ndef make():\n    torch.manual_seed(0)\n"
                   "    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval(), "
                   "(torch.randn(4, 32),)\n")
    out = tmp_path / "o"
    code = main(["lower", f"{src}:make", "--scheme", "uniform", "--bits", "8", "--act-bits", "8", "--out", str(out), "--runtime", "onnxruntime",
                 "--quiet", "--json", "--no-compile"])
    ort = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["onnxruntime"]
    assert code == 0 and ort["latency_ms"] > 0 and ort["speedup_vs_ort_fp32"] > 0
    assert ort["quality"]["cosine"] >= 0.99
    report = (out / "report.md").read_text()
    assert "| qgraph -> onnxruntime |" in report.split("## ", 2)[1]  # a row of the headline table


def test_cli_onnxruntime_route_quantizes_residual_block_outputs(tmp_path, capsys):
    """``--runtime onnxruntime`` annotates with residual_outputs: the conv feeding the residual Add runs as a
    QLinearConv in the session, and the --runtime torch pipeline does not carry the option."""
    from qgraph.cli import main

    src = tmp_path / "net.py"
    src.write_text("import torch, torch.nn as nn\n\nclass Net(nn.Module):\n    def __init__(self):\n"
                   "        super().__init__()\n        self.a = nn.Conv2d(3, 8, 3, padding=1)\n"
                   "        self.b = nn.Conv2d(8, 8, 1)\n        self.c = nn.Conv2d(8, 4, 1)\n\n"
                   "    def forward(self, x):\n        h = self.a(x)\n        return self.c(self.b(h) + h)\n\n"
                   "def make():\n    torch.manual_seed(0)\n    return Net().eval(), (torch.randn(2, 3, 8, 8),)\n")
    pipes = {}
    for runtime in ("torch", "onnxruntime"):
        out = tmp_path / runtime
        code = main(["lower", f"{src}:make", "--act-bits", "8", "--out", str(out), "--runtime", runtime, "--quiet",
                     "--no-measure", "--json", "--no-compile"])
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert code == 0
        pipes[runtime] = summary["pipeline"]
    assert "residual_outputs=true" in pipes["onnxruntime"] and "residual_outputs" not in pipes["torch"]
    # a (its output read Q/DQ'd by the Add) and b (its output quantized); c's output is the model's, so it stays
    # float
    assert summary["onnxruntime"]["optimized_ops"]["QLinearConv"] == 2, summary["onnxruntime"]["optimized_ops"]
