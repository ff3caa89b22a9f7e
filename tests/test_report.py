"""The `qgraph lower` report leads with the answer: end-to-end latency at the user's batch, stored bytes and
quality against the float model and onnxruntime fp32, before the per-layer tables. No timing is asserted:
the tests check what is measured, against what, and that --no-measure times nothing."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import qgraph
from qgraph import report as report_mod
from qgraph.cli import EXIT_OK, main
from qgraph.report import compare_outputs, end_to_end, stored_bytes

FACTORY = '''
import torch, torch.nn as nn

def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    return model, (torch.randn(4, 32),)
'''
BCQ = ["--scheme", "bcq", "--bits", "3", "--group-size", "32"]


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(FACTORY)
    return f"{path}:make_model"


def _lower(factory, tmp_path, capsys, *extra):
    out = tmp_path / "o"
    code = main(["lower", factory, *BCQ, "--out", str(out), "--quiet", "--json", *extra])
    assert code == EXIT_OK, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    return summary, (out / "report.md").read_text(), json.loads((out / "report.json").read_text())


def test_report_leads_with_end_to_end_numbers(factory, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    summary, md, rep = _lower(factory, tmp_path, capsys, "--no-compile")
    answer, layers = md.index("## The answer"), md.index("## Per-layer quantization error")
    assert answer < layers and md.index("| float (torch eager) |") < layers
    assert md.index("| onnxruntime fp32 |") < layers and md.index("| **qgraph, eager** |") < layers
    e2e = rep["end_to_end"]
    assert e2e["batch"] == 4 and e2e["execution"] == "eager"
    rows = e2e["rows"]
    assert set(rows) == {"float", "onnxruntime fp32", "qgraph"}
    assert all(rows[k]["ms"] > 0 for k in rows)
    assert e2e["speedup_vs_float"] == pytest.approx(rows["float"]["ms"] / rows["qgraph"]["ms"])
    assert e2e["speedup_vs_ort_fp32"] == pytest.approx(rows["onnxruntime fp32"]["ms"] / rows["qgraph"]["ms"])
    assert summary["speedup_vs_ort_fp32"] == pytest.approx(e2e["speedup_vs_ort_fp32"])
    # the float model: 32*64 + 64 + 64*8 + 8 fp32 values; the BCQ-3 model stores far less
    assert rows["float"]["bytes"] == 4 * (32 * 64 + 64 + 64 * 8 + 8)
    assert 0 < rows["qgraph"]["bytes"] < 0.5 * rows["float"]["bytes"]
    assert rows["onnxruntime fp32"]["quality"]["rel_err"] < 1e-5  # the export is the float model
    assert 0.9 < rows["qgraph"]["quality"]["cosine"] < 1.0
    assert rows["qgraph"]["quality_vs_ort"]["cosine"] == pytest.approx(rows["qgraph"]["quality"]["cosine"], abs=1e-5)
    assert rep["compile"]["requested"] == "off" and rep["compile"]["used"] == "eager"


def test_no_measure_times_nothing(factory, tmp_path, capsys, monkeypatch):
    from qgraph import analyses, execution

    def fail(*a, **k):
        raise AssertionError("timed or exported with --no-measure")

    monkeypatch.setattr(execution, "interleaved_seconds", fail)
    monkeypatch.setattr(execution, "compile_module", fail)
    monkeypatch.setattr(analyses, "measure_node_latency", fail)
    monkeypatch.setattr(report_mod, "export_ort_fp32", fail)
    summary, md, rep = _lower(factory, tmp_path, capsys, "--no-measure")  # compile defaults to auto
    e2e = rep["end_to_end"]
    assert all("ms" not in r for r in e2e["rows"].values()) and "onnxruntime fp32" not in e2e["rows"]
    assert any("timing is off" in n for n in e2e["notes"])
    assert rep["compile"]["requested"] == "auto" and rep["compile"]["used"] == "eager"
    assert rep["compile"]["seconds"] is None
    assert summary["latency_ms"] is None and summary["execution"] == "eager"
    assert 0.9 < e2e["rows"]["qgraph"]["quality"]["cosine"] < 1.0  # quality needs no timing
    assert md.index("## The answer") < md.index("## Per-layer quantization error")


def test_compile_flag_compiles_and_reports_both(factory, tmp_path, capsys):
    summary, md, rep = _lower(factory, tmp_path, capsys, "--compile")
    assert rep["compile"]["requested"] == "on" and rep["compile"]["used"] == "compiled"
    assert rep["compile"]["seconds"] > 0 and summary["execution"] == "compiled"
    rows = rep["end_to_end"]["rows"]
    assert rows["qgraph"]["ms"] > 0 and rows["qgraph eager"]["ms"] > 0
    assert "| **qgraph, compiled** |" in md and "| qgraph, eager |" in md
    assert sorted(p.name for p in (tmp_path / "o" / "model").iterdir()) == sorted(
        ["manifest.json", "weights.safetensors", "program.json", "program.safetensors"])


def test_a_failed_onnx_export_is_a_note(monkeypatch):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    x = torch.randn(3, 32)
    q = qgraph.quantize(model, (x,), pipeline=qgraph.api.lowering_pipeline("scheme=bcq,bits=4,group_size=32"),
                        progress=False)

    def broken(*a, **k):
        raise RuntimeError("exporter cannot\nmore")

    monkeypatch.setattr(report_mod, "export_ort_fp32", broken)
    e2e = end_to_end(q, model, (x,), rounds=3)
    assert "onnxruntime fp32" not in e2e["rows"] and e2e["speedup_vs_ort_fp32"] is None
    assert any("exporter cannot" in n and "\n" not in n for n in e2e["notes"])
    assert e2e["rows"]["qgraph"]["ms"] > 0 and e2e["rows"]["float"]["ms"] > 0
    md = "\n".join(report_mod.headline_markdown(e2e))
    assert "onnxruntime fp32 skipped" in md and "| **qgraph, eager** |" in md


def test_compare_outputs():
    ref = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    out = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    q = compare_outputs(ref, out, logits=True)
    assert q["cosine"] == pytest.approx((2 ** -0.5 + 1.0) / 2)
    assert q["rel_err"] == pytest.approx(0.5)
    assert q["agreement"] == pytest.approx(1.0)
    assert "agreement" not in compare_outputs(ref, out)
    assert compare_outputs((ref,), {"y": -ref}, logits=True)["agreement"] == pytest.approx(0.0)
    assert compare_outputs(ref, ref[:1]) == {}


def test_stored_bytes_counts_a_tied_tensor_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    m = nn.ModuleDict({"emb": emb, "head": head})
    assert stored_bytes(m) == 10 * 4 * 4
    m.register_buffer("codes", torch.zeros(6, dtype=torch.int8))
    assert stored_bytes(m) == 10 * 4 * 4 + 6
