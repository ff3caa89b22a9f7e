"""bench/biqgemm.py's CPU helpers on tiny shapes: the calibration writes a target entry the loader reads, the goal
table and the call-overhead mode run, and the JSON records follow DESIGN §7."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qgraph.kernels import cpu
from qgraph.target import load_target

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "biqgemm.py"
pytestmark = pytest.mark.skipif(not cpu.available(), reason="the C++ extension is not built")


def _bench():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("biqgemm_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_write_target_entry_inserts_then_replaces(tmp_path):
    bench = _bench()
    toml = tmp_path / "t.toml"
    shutil.copy(ROOT / "targets" / "generic.toml", toml)
    bench.write_target_entry(toml, {"exact": 7, "fast": 3})
    assert load_target(str(toml)).cost.biqgemm_lut_max_rows == {"exact": 7, "fast": 3}
    bench.write_target_entry(toml, {"fast": 5})
    assert load_target(str(toml)).cost.biqgemm_lut_max_rows == {"exact": 7, "fast": 5}
    assert toml.read_text().count("biqgemm_lut_max_rows") == 1


def test_goal_table_marks_misses():
    bench = _bench()
    goal = {(64, 64, 3, "row"): {1: {"exact": (10.0, 20.0), "fast": (5.0, 20.0)}, 8: {"fast": (30.0, 20.0)}}}
    text = bench.goal_table(goal, [1, 8, 16])
    assert "| 64x64 q3 row | 4.00 | 0.67* | — |" in text


def test_calibrate_and_call_overhead_run(tmp_path):
    toml = tmp_path / "t.toml"
    shutil.copy(ROOT / "targets" / "generic.toml", toml)
    out = tmp_path / "cal.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--calibrate", "--shapes", "64x96", "--batches", "1,8",
                          "--bits", "3", "--groups", "32", "--min-time", "0.01", "--write-target", str(toml),
                          "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "biqgemm_lut_max_rows = {" in run.stdout
    rows = load_target(str(toml)).cost.biqgemm_lut_max_rows
    assert set(rows) == {"exact", "fast"} and all(v in (0, 1, 8) for v in rows.values())
    recs = json.loads(out.read_text())
    assert recs and all(r["metric"] == "median_us" and r["value"] > 0 for r in recs)
    out2 = tmp_path / "call.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--call-overhead", "--min-time", "0.01", "--json", str(out2)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    cases = {r["case"] for r in json.loads(out2.read_text())}
    assert {"576x576 b1 q3 g128 call-native-op", "576x576 b1 q3 g128 call-python-ctypes-op"} <= cases


def test_small_cpu_run_records(tmp_path):
    out = tmp_path / "b.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--shapes", "64x128", "--batches", "1,9", "--bits", "3",
                          "--groups", "row", "--baselines", "fp32", "--skip", "lut-torch", "--min-time", "0.01",
                          "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "fp32 F.linear ÷ faster BiQGEMM mode" in run.stdout
    recs = json.loads(out.read_text())
    paths = {r["case"]: r["path"] for r in recs if r["metric"] == "median_us" and "path" in r}
    assert paths["64x128 b1 q3 biqgemm-fast"] == "lut" and paths["64x128 b9 q3 biqgemm-fast"] == "gemm"
    errs = [r["value"] for r in recs if r["metric"] == "max_rel_err" and r["case"].endswith("exact")]
    assert errs and max(errs) <= 1e-5
