"""bench/quality_reconstruction.py end to end on the digits CNN with RTN only (seconds): records in the
DESIGN §7 shape, RTN W4A8 keeps the accuracy, W2A4 collapses, and an unregistered method is a row, not a crash."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.models,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed"),
]

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "quality_reconstruction.py"


def _bench():
    spec = importlib.util.spec_from_file_location("quality_reconstruction", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_config():
    bench = _bench()
    assert bench.parse_config("W4A8") == (4, 8)
    assert bench.parse_config("W2A4") == (2, 4)
    assert bench.parse_config("W3A32") == (3, 0)
    with pytest.raises(SystemExit):
        bench.parse_config("W9A8")
    assert bench.pipeline_text(2, 4, None, None) == (
        "fold-bn,dce,fuse-activation,annotate{bits=2,act_bits=4},calibrate,quantize-weights,insert-fq")
    assert bench.pipeline_text(4, 0, "sparq", None, "insert-fq").endswith("quantize-weights,insert-fq,sparq")
    assert ",calibrate,adaround{iters=9},quantize-weights," in bench.pipeline_text(4, 8, "adaround{iters=9}", None)


def test_quick_digits_rtn_records(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = _bench().main(["--quick", "--models", "digits-cnn", "--methods", "rtn", "no-such-pass",
                        "--configs", "W4A8", "W2A4", "--json", str(out)])
    assert rc == 0
    recs = json.loads(out.read_text())
    assert all({"case", "metric", "value"} <= set(r) and isinstance(r["value"], float) for r in recs)
    by = {(r["case"], r["metric"]): r["value"] for r in recs}
    fp32 = by[("digits-cnn fp32", "accuracy")]
    w4 = by[("digits-cnn W4A8 rtn", "accuracy")]
    assert fp32 >= 0.97
    assert w4 >= 0.95 and fp32 - w4 <= 0.03
    assert by[("digits-cnn W4A8 rtn", "kl")] < 0.1
    assert by[("digits-cnn W2A4 rtn", "accuracy")] < 0.5  # 2-bit round-to-nearest breaks this CNN
    assert by[("digits-cnn W4A8 rtn", "seconds")] > 0
    assert not any("no-such-pass" in r["case"] for r in recs)
    table = capsys.readouterr().out
    assert "| digits-cnn | W2A4 | no-such-pass | not available |" in table
    assert "| digits-cnn | fp32 | - |" in table
