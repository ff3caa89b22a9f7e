"""bench/e2e.py's machinery on a small model (seconds, nothing timed is asserted): every row gets the DESIGN §7
metrics, speedups are ORT fp32's median over the row's, a compiled qgraph row stays within 1e-4 of its eager
row in exact mode, and the goal table says yes / no from the records."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "e2e.py"
DESIGN_METRICS = {"median_us", "speedup_vs_ort_fp32", "bytes", "cosine", "agreement", "seconds"}


def _bench():
    spec = importlib.util.spec_from_file_location("e2e_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_registered_with_the_cli():
    from qgraph.cli import BENCHES

    assert BENCHES["e2e"] == SCRIPT.name and SCRIPT.is_file()


def test_pipelines_parse():
    import qgraph

    bench = _bench()
    for text in [*bench.minilm_pipelines().values(), *bench.mobilenet_pipelines().values()]:
        qgraph.PassManager(text)


def test_rows_of_a_small_model(tmp_path):
    pytest.importorskip("onnxruntime")
    import qgraph

    bench = _bench()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    calib = [(torch.randn(16, 64),)]
    x = torch.randn(8, 64)
    with torch.no_grad():
        ref = model(x)

    def quality(fn) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cosine_similarity(fn(x), ref, dim=-1).mean())

    dyn = ({0: torch.export.Dim("batch", min=1, max=64)},)
    ort = bench.OrtModel(bench.export_onnx(model, (x[:2],), ["x"], dyn, tmp_path / "m.onnx"))
    routes = [bench.Route("eager fp32", model, bench.stored_bytes(model), 1.0),
              bench.Route("onnxruntime fp32", ort, bench._file_bytes(ort.path), quality(ort))]
    pipe = qgraph.api.lowering_pipeline("scheme=bcq,bits=4,group_size=32", verify_tol=1e-5)  # exact mode
    routes += bench.qgraph_route("BCQ-4", model, (x[:2],), calib, pipe, None, quality)
    suite = bench.Suite("tiny", "cosine", routes, [("tiny b1", (x[:1],)), ("tiny b8", (x,))])
    rec = bench.Records()
    tables = bench.run_suite(suite, rec, rounds=3, budget_s=1.0, profile=False, profiles=[])
    assert [t[0] for t in tables] == ["tiny b1", "tiny b8"]
    val = {(r["case"], r["metric"]): r["value"] for r in rec.items}
    assert {m for _, m in val} <= DESIGN_METRICS
    for label in ("tiny b1", "tiny b8"):
        ort_us = val[(f"{label} onnxruntime fp32", "median_us")]
        for r in routes:
            us = val[(f"{label} {r.name}", "median_us")]
            assert val[(f"{label} {r.name}", "speedup_vs_ort_fp32")] == pytest.approx(ort_us / us)
        rows = {row[0]: row for row in dict(tables)[label]}
        assert float(rows["qgraph BCQ-4 compiled"][6]) <= 1e-4  # compiled vs eager, exact tables
        assert "BiQGEMM exact" in rows["qgraph BCQ-4"][7]
    assert 0.9 < val[("tiny b1 qgraph BCQ-4", "cosine")] < 1.0
    assert val[("tiny b1 onnxruntime fp32", "cosine")] > 0.99999
    assert val[("tiny b1 qgraph BCQ-4", "bytes")] < 0.5 * val[("tiny b1 eager fp32", "bytes")]


def test_goal_rows():
    bench = _bench()
    rec = bench.Records()
    for b, (w8, bcq4) in ((1, (1.5, 0.8)), (8, (1.2, 1.1))):
        case = f"minilm s64 b{b}"
        rec.add(f"{case} onnxruntime fp32", "median_us", 100.0)
        rec.add(f"{case} qgraph W8A8 compiled", "speedup_vs_ort_fp32", w8)
        rec.add(f"{case} qgraph W8A8 compiled", "cosine", 0.995)
        rec.add(f"{case} qgraph BCQ-3 compiled", "speedup_vs_ort_fp32", 3.0)
        rec.add(f"{case} qgraph BCQ-3 compiled", "cosine", 0.9)  # fast but below 0.99: not a candidate
        rec.add(f"{case} qgraph BCQ-4 compiled", "speedup_vs_ort_fp32", bcq4)
        rec.add(f"{case} qgraph BCQ-4 compiled", "cosine", 0.97)
    rows = bench.goal_rows(rec)
    assert [r[2] for r in rows] == ["yes", "no", "no", "yes"]
    assert rows[0][1] == "qgraph W8A8 compiled: 1.50x"


def test_summary_tables_from_records():
    bench = _bench()
    items = [{"case": "minilm s64 b1 onnxruntime fp32", "metric": "median_us", "value": 16000.0},
             {"case": "minilm s64 b1 onnxruntime fp32", "metric": "speedup_vs_ort_fp32", "value": 1.0},
             {"case": "minilm s64 b1 qgraph W8A8 compiled", "metric": "median_us", "value": 8000.0},
             {"case": "minilm s64 b1 qgraph W8A8 compiled", "metric": "speedup_vs_ort_fp32", "value": 2.0},
             {"case": "minilm s64 b1 qgraph W8A8 compiled", "metric": "cosine", "value": 0.9974},
             {"case": "minilm s64 b1 qgraph W8A8 compiled", "metric": "bytes", "value": 23.3e6},
             {"case": "smollm2 prefill128 b8 eager fp32", "metric": "median_us", "value": 2e6},
             {"case": "smollm2 prefill128 b8 eager fp32", "metric": "speedup_vs_ort_fp32", "value": 0.8},
             {"case": "e2e total", "metric": "seconds", "value": 300.0}]
    text = bench.summary_tables(items)
    assert "#### minilm" in text and "#### smollm2" in text and "e2e total" not in text
    assert "| qgraph W8A8 compiled | 0.9974 | 23.3 | 8.0 (2.00x) |" in text
    assert "| onnxruntime fp32 | — | — | 16.0 (1.00x) |" in text
    assert "| eager fp32 | — | — | 2000.0 (0.80x) |" in text


def test_a_searched_strategy_route_lowers_its_per_layer_choices():
    """``qgraph_route(strategy=...)``: what the e2e searched row runs — one Linear BCQ-4 on BiQGEMM, one float."""
    from qgraph.quant.qspec import Annotation, QSpec

    bench = _bench()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    x = torch.randn(8, 64)
    strategy = {"0": Annotation(weight=QSpec.bcq(4, group_size=32)), "2": Annotation(fallback_float=True)}
    eager, compiled = bench.qgraph_route("searched", model, (x[:2],), [(x,)], bench.lowering_pipeline(verify_tol=1e-2),
                                         None, lambda fn: 1.0, strategy=strategy, note="searched in 1 s")
    assert eager.note.startswith("searched in 1 s; 1/") and "BiQGEMM fast" in eager.note, eager.note
    with torch.no_grad():
        ref, out = model(x), eager.fn(x)
    assert float((out - ref).abs().max() / ref.abs().max()) <= 0.1
    assert eager.bytes < bench.stored_bytes(model)
