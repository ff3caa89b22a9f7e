"""The qgraph command: working runs, and wrong usage → one clear line, a non-zero exit code, no traceback."""
import json
import subprocess
import sys

import pytest
import torch

from qgraph.cli import EXIT_INPUT, EXIT_OK, EXIT_USAGE, main

FACTORY = '''
import torch, torch.nn as nn

def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    return model, (torch.randn(4, 32),)
'''


@pytest.fixture
def model_file(tmp_path):
    p = tmp_path / "net.py"
    p.write_text(FACTORY)
    return f"{p}:make_model"


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_lower_a_factory_model_with_calibration_file(tmp_path, model_file, capsys):
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(32, 32), calib)
    out = tmp_path / "out"
    code, stdout, err = _run(["lower", model_file, "--calib", str(calib), "--out", str(out), "--json", "--quiet"],
                             capsys)
    assert code == EXIT_OK, err
    summary = json.loads(stdout)
    assert summary["target"] == "x86-avx2" and summary["weight_bytes"] < summary["fp32_weight_bytes"] / 3
    assert (out / "report.md").exists() and (out / "report.html").exists() and (out / "layer_error.png").exists()
    assert (out / "model" / "weights.safetensors").exists()


def test_lower_bcq_with_flags_reports_lowered_layers(tmp_path, model_file, capsys):
    code, stdout, err = _run(["lower", model_file, "--scheme", "bcq", "--bits", "3", "--group-size", "32",
                              "--out", str(tmp_path / "o"), "--quiet", "--json", "--no-measure"], capsys)
    assert code == EXIT_OK, err
    s = json.loads(stdout)
    assert s["lowered"] == 2 and s["float"] == 0 and s["verify_output_rel_err"] < 1e-4


@pytest.mark.parametrize("argv, message", [
    (["lower", "/nonexistent/net.py:make_model"], "model file /nonexistent/net.py does not exist"),
    (["lower", "resnet9000"], "unknown model 'resnet9000'"),
    (["lower", "MODEL", "--target", "x86-avx3"], "unknown target 'x86-avx3'"),
    (["lower", "MODEL", "--pipeline", "fold-bn,annotate{bits=}"], "bad pipeline text"),
    (["lower", "MODEL", "--pipeline", "fold-bn,quantise"], "unknown pass 'quantise'"),
    (["lower", "MODEL", "--calib", "CALIB_BAD"], "calibration input 'input_1' has shape [8, 31]"),
    (["lower", "MODEL", "--calib", "/nonexistent.pt"], "calibration data /nonexistent.pt does not exist"),
    (["lower", "MODEL", "--scheme", "bcq", "--bits", "3", "--target", "npu-int8"], "cannot run 2 annotated node"),
    (["targets", "show", "nope"], "unknown target 'nope'"),
])
def test_wrong_input_is_one_line_and_exit_3(argv, message, model_file, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    torch.save(torch.randn(16, 31), bad)
    argv = [model_file if a == "MODEL" else str(bad) if a == "CALIB_BAD" else a for a in argv]
    argv += ["--quiet", "--out", str(tmp_path / "o")] if argv[0] == "lower" else []
    code, _, err = _run(argv, capsys)
    assert code == EXIT_INPUT
    assert err.startswith("qgraph: error: ") and message in err.splitlines()[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [[], ["lower"], ["lower", "x", "--bits", "three"], ["frobnicate"]])
def test_wrong_usage_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        rc = main(argv)
        raise SystemExit(rc)
    assert e.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_targets_and_passes_listings(capsys, tmp_path):
    code, out, _ = _run(["targets", "list", "--json"], capsys)
    assert code == 0 and {"x86-avx2", "npu-int8", "gpu-sm90"} <= {t["name"] for t in json.loads(out)}
    code, out, _ = _run(["targets", "show", "npu-int8", "--json"], capsys)
    assert code == 0 and json.loads(out)["bcq"] is False
    code, out, _ = _run(["passes", "--json"], capsys)
    names = {p["name"] for p in json.loads(out)}
    assert {"fold-bn", "annotate", "calibrate", "lower-bcq", "verify"} <= names
    bad = tmp_path / "t.toml"
    bad.write_text('name = "t"\n')
    code, _, err = _run(["targets", "validate", str(bad)], capsys)
    assert code == EXIT_INPUT and "t.toml: key 'kernels' is missing" in err


def test_inspect_prints_annotations(model_file, capsys):
    code, out, _ = _run(["inspect", model_file, "--pipeline", "annotate{scheme=bcq,bits=2,group_size=32}"], capsys)
    assert code == 0 and out.count("w=bcq2/g32/weighted") == 2


def test_console_script_has_no_traceback_on_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qgraph.cli", "lower", str(tmp_path / "missing.py:f")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_INPUT
    assert proc.stderr.strip().splitlines()[-1].startswith("qgraph: error: model file")
    assert "Traceback" not in proc.stderr


def test_lower_an_onnx_file_writes_qdq_onnx(tmp_path, capsys):
    import onnx

    from tests.ir.test_onnx_adapter import _mlp_proto

    path = tmp_path / "mlp.onnx"
    onnx.save(_mlp_proto(), str(path))
    code, stdout, err = _run(["lower", str(path), "--out", str(tmp_path / "o"), "--quiet", "--json"], capsys)
    assert code == EXIT_OK, err
    s = json.loads(stdout)
    out = onnx.load(s["artifact"])
    onnx.checker.check_model(out)
    ops = [n.op_type for n in out.graph.node]
    # 2 weights + 2 activations + the first Gemm's bias as int32 codes (the second layer is a MatMul, no bias)
    assert ops.count("DequantizeLinear") == 5 and ops.count("QuantizeLinear") == 2


def test_corrupt_onnx_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    code, _, err = _run(["lower", str(bad), "--quiet"], capsys)
    assert code == EXIT_INPUT
    assert "not a readable ONNX model" in err.splitlines()[0] or "fails onnx.checker" in err.splitlines()[0]


def test_bench_runs_a_script_and_unknown_name_is_usage(capsys):
    assert main(["bench", "nope"]) == EXIT_USAGE  # main(argv) returns usage errors; it does not raise


def test_lower_then_export_to_onnx(tmp_path, model_file, capsys):
    import onnx

    out = tmp_path / "o"
    code, _, err = _run(["lower", model_file, "--scheme", "bcq", "--bits", "3", "--group-size", "32", "--out",
                         str(out), "--quiet", "--no-measure"], capsys)
    assert code == EXIT_OK, err
    for portable in (False, True):
        onnx_path = tmp_path / f"m{int(portable)}.onnx"
        argv = ["export", str(out / "model"), "--model", model_file, "--out", str(onnx_path), "--json"] + (
            ["--portable"] if portable else [])
        code, stdout, err = _run(argv, capsys)
        assert code == EXIT_OK, err
        onnx.checker.check_model(str(onnx_path))
        ops = {n.op_type for n in onnx.load(str(onnx_path)).graph.node}
        assert ("BiQGEMM" in ops) != portable


def test_export_needs_an_artifact_folder(tmp_path, capsys):
    code, _, err = _run(["export", str(tmp_path), "--out", str(tmp_path / "x.onnx")], capsys)
    assert code == EXIT_INPUT and "not a qgraph artifact" in err
