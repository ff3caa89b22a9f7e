"""Bad input to the qgraph command: one clear line and exit 2 (usage) or 3 (input), checked before heavy work."""
import numpy as np
import pytest
import torch

from qgraph.cli import EXIT_INPUT, EXIT_USAGE, main

FACTORY = '''
import torch, torch.nn as nn

def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval(), (torch.randn(4, 32),)

def raising():
    raise RuntimeError("the factory failed")

def wrong_shape():
    return nn.Sequential(nn.Linear(32, 8)).eval(), (torch.randn(4, 31),)
'''


@pytest.fixture
def spec(tmp_path):
    p = tmp_path / "net.py"
    p.write_text(FACTORY)
    return str(p)


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.err


def _one_line(err: str) -> bool:
    return err.startswith("qgraph: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("argv", [
    ["lower", "M", "--group-size", "1000000000000"], ["lower", "M", "--group-size", "0"],
    ["lower", "M", "--bits", "99"], ["lower", "M", "--act-bits", "-1"],
    ["search", "M", "--eval-size", "0", "--avg-bits", "4"], ["search", "M", "--workers", "-3", "--avg-bits", "4"],
    ["search", "M", "--group-sizes=-5,0", "--avg-bits", "4"], ["search", "M", "--hutchinson-iters", "0", "--avg-bits", "4"],
    ["search", "M", "--avg-bits", "nan"], ["search", "M", "--max-latency", "-1"], ["search", "M", "--trials", "0"],
])
def test_out_of_range_options_are_usage_errors(argv, spec, capsys):
    code, err = _run([a if a != "M" else f"{spec}:make_model" for a in argv], capsys)
    assert code == EXIT_USAGE and _one_line(err), err


def _calib_cases(tmp_path):
    torch.save(torch.randn(16, 32).double(), tmp_path / "f64.pt")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "f64.npy", np.random.rand(16, 32))
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04not a tensor file")
    return ["f64.pt", "obj.npy", "f64.npy", "junk.pt"]


def test_bad_inputs_exit_3_with_one_line(spec, tmp_path, capsys):
    cases = [["lower", f"{spec}:raising"], ["lower", f"{spec}:wrong_shape"]]
    cases += [["lower", f"{spec}:make_model", "--calib", str(tmp_path / c)] for c in _calib_cases(tmp_path)]
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{not json")
    cases.append(["lower", str(hf)])
    (tmp_path / "cache").mkdir()
    cases.append(["search", f"{spec}:make_model", "--avg-bits", "4", "--cache", str(tmp_path / "cache")])
    (tmp_path / "m.onnx").write_bytes(b"junk")
    cases += [["inspect", str(tmp_path / "m.onnx")], ["search", str(tmp_path / "m.onnx"), "--avg-bits", "4"]]
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases += [["lower", f"{spec}:make_model", "--out", o] for o in (str(afile), "/dev/null", "/proc/x/y")]
    for argv in cases:
        code, err = _run(argv + ["--quiet"] if argv[0] != "inspect" else argv, capsys)
        lines = [ln for ln in err.splitlines() if ln.startswith("qgraph: error")]
        assert code == EXIT_INPUT and len(lines) == 1, (argv, err)
        assert "Traceback" not in err and "E1207" not in err and len(err.splitlines()) <= 4, (argv, err)


def test_random_bytes_are_not_calibration_text(tmp_path, capsys):
    from qgraph.errors import CalibrationError
    from qgraph.model_source import ModelSource, load_calibration

    p = tmp_path / "r.txt"
    p.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    src = ModelSource("m", torch.nn.Identity(), (), None, tokenizer=object(), kind="text")
    with pytest.raises(CalibrationError, match="not UTF-8|unprintable"):
        load_calibration(str(p), src)


def test_pipeline_error_caret_points_at_the_column(spec, capsys):
    code, err = _run(["lower", f"{spec}:make_model", "--pipeline", "fold-bn,annotate{bits=3,,},calibrate"], capsys)
    assert code == EXIT_INPUT
    lines = err.splitlines()
    text_line = next(ln for ln in lines if "fold-bn,annotate" in ln)
    caret = lines[lines.index(text_line) + 1]
    col = int(err.split("column ")[1].split()[0])
    assert caret.index("^") - text_line.index("fold-bn") == col - 1


def test_quiet_prints_nothing_on_success(spec, tmp_path, capsys):
    code = main(["lower", f"{spec}:make_model", "--out", str(tmp_path / "o"), "--quiet", "--no-measure"])
    out = capsys.readouterr()
    assert code == 0 and out.err == ""


def test_a_bug_inside_a_pass_is_an_internal_error_naming_the_pass(spec, tmp_path, capsys):
    import qgraph

    @qgraph.register_pass("corpus-crash", replace=True)
    def crash(graph, ctx):
        """A pass with a bug."""
        raise ZeroDivisionError("oops")

    code, err = _run(["lower", f"{spec}:make_model", "--pipeline", "fold-bn,corpus-crash", "--out",
                      str(tmp_path / "o"), "--quiet", "--no-measure"], capsys)
    assert code == 1 and "internal error: pass 'corpus-crash' (after fold-bn): ZeroDivisionError: oops" in err
    assert err.count("\n") == 1
