"""Compiled execution of lowered graphs (qgraph.execution, ``qgraph.quantize(compile=...)``): parity with the
simulation, artifacts unchanged by compiling, typed errors for bad input, one warning on a compile failure.
Nothing here is timed: ``auto``'s choice is checked with the measurement replaced."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import qgraph
from qgraph import execution
from qgraph.artifact import load_artifact, save_artifact
from qgraph.execution import CompileFallbackWarning
from tests.conftest import rel_err

BCQ_EXACT = ("fold-bn,dce,fuse-activation,annotate{scheme=bcq,bits=4,group_size=32},quantize-weights,insert-fq,"
             "lower-bcq{mode=exact},dce,verify{tol=1e-4}")
INT8 = "fold-bn,dce,fuse-activation,annotate{bits=8,act_bits=7},calibrate,quantize-weights,insert-fq,lower-int8,dce"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.LayerNorm(128), nn.Linear(128, 32)).eval()


@pytest.fixture(scope="module")
def bcq_compiled():
    model = _model()
    x = torch.randn(4, 64)
    return model, x, qgraph.quantize(model, (x,), pipeline=BCQ_EXACT, progress=False, compile=True)


def test_compiled_bcq_exact_matches_the_simulation(bcq_compiled):
    _, _, q = bcq_compiled
    assert q.compiled and q.report["compile"]["used"] == "compiled" and q.report["compile"]["error"] is None
    assert q.report["compile"]["seconds"] > 0
    sim = q.artifacts["simulation"]
    for rows in (1, 3, 16, 64):  # both BiQGEMM paths (LUT at few rows, decode + GEMM at many)
        x = torch.randn(rows, 64)
        with torch.no_grad():
            assert rel_err(q(x), sim(x)) <= 1e-4
            assert rel_err(q(x), q.eager(x)) <= 1e-5


def test_compiled_int8_matches_the_simulation():
    model = _model()
    x = torch.randn(4, 64)
    q = qgraph.quantize(model, (x,), calib=[(torch.randn(16, 64),)], pipeline=INT8, progress=False, compile="on")
    assert q.compiled
    sim = q.artifacts["simulation"]
    for rows in (1, 16):
        xb = torch.randn(rows, 64)
        with torch.no_grad():
            assert rel_err(q(xb), sim(xb)) <= 1e-4


def test_compiled_code_never_reaches_the_artifact(bcq_compiled, tmp_path):
    _, x, q = bcq_compiled
    assert all(k.startswith("gm.") for k in q.state_dict())  # the compiled module is not a submodule
    folder = save_artifact(q, tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["manifest.json", "weights.safetensors", "program.json", "program.safetensors"])
    loaded = load_artifact(folder)
    assert not loaded.compiled
    x2 = torch.randn(7, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x2), q.eager(x2))  # bit-identical to the eager lowered model
        assert rel_err(q(x2), loaded(x2)) <= 1e-5


@pytest.mark.parametrize("bad, match", [
    (lambda: torch.randn(4, 64, dtype=torch.float64), "float32"),
    (lambda: torch.randint(0, 5, (4, 64)), "float32"),
    (lambda: torch.randn(4, 65), r"\[\.\.\., 64\]"),
])
def test_bad_input_to_the_compiled_model_is_a_typed_error(bcq_compiled, bad, match):
    _, _, q = bcq_compiled
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        with pytest.raises(qgraph.KernelError, match=match):
            q(bad())
    assert q.compiled  # a bad input is the caller's error, not a compile failure


def test_non_contiguous_input_runs_compiled(bcq_compiled):
    _, _, q = bcq_compiled
    x = torch.randn(64, 8).t()
    assert not x.is_contiguous()
    with torch.no_grad():
        assert rel_err(q(x), q.eager(x.contiguous())) <= 1e-5


def _failing_backend(gm, example_inputs):
    raise RuntimeError("backend exploded\nsecond line")


def test_compile_failure_falls_back_to_eager_with_one_warning(capfd):
    model = _model()
    x = torch.randn(4, 64)
    q = qgraph.quantize(model, (x,), pipeline=BCQ_EXACT, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = q.compile_execution("on", backend=_failing_backend)
    fallbacks = [w for w in caught if issubclass(w.category, CompileFallbackWarning)]
    assert len(fallbacks) == 1 and "\n" not in str(fallbacks[0].message)
    assert "backend exploded" in str(fallbacks[0].message)
    assert info["used"] == "eager" and "backend exploded" in info["error"] and not q.compiled
    assert q.report["compile"] is info
    assert "Traceback" not in capfd.readouterr().err
    with torch.no_grad():
        assert torch.equal(q(x), q.eager(x))


def test_a_later_failure_drops_the_compiled_code_once():
    model = _model()
    x = torch.randn(4, 64)
    q = qgraph.quantize(model, (x,), pipeline=BCQ_EXACT, progress=False)
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("recompile failed")

    q._compiled = execution.CompiledCall(q.gm, broken, "test", (x,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1, y2 = q(x), q(x)
    assert len([w for w in caught if issubclass(w.category, CompileFallbackWarning)]) == 1
    assert calls == [1] and not q.compiled
    with torch.no_grad():
        assert torch.equal(y1, q.eager(x)) and torch.equal(y2, q.eager(x))


@pytest.mark.parametrize("eager_ms, compiled_ms, used", [(2.0, 1.0, "compiled"), (1.0, 2.0, "eager")])
def test_auto_keeps_the_faster(monkeypatch, eager_ms, compiled_ms, used):
    model = _model()
    x = torch.randn(4, 64)
    q = qgraph.quantize(model, (x,), pipeline=BCQ_EXACT, progress=False)
    monkeypatch.setattr(execution, "interleaved_seconds", lambda fns, *a, **k: {"eager": [eager_ms / 1e3],
                                                                                "compiled": [compiled_ms / 1e3]})
    info = q.compile_execution("auto", backend="aot_eager")
    assert info["used"] == used and q.compiled == (used == "compiled")
    assert info["eager_ms"] == pytest.approx(eager_ms) and info["compiled_ms"] == pytest.approx(compiled_ms)
    assert info["seconds"] is not None


def test_auto_without_measuring_stays_eager_and_compiles_nothing(monkeypatch):
    model = _model()
    x = torch.randn(4, 64)
    q = qgraph.quantize(model, (x,), pipeline=BCQ_EXACT, progress=False)
    monkeypatch.setattr(execution, "compile_module", lambda *a, **k: pytest.fail("compiled without a measurement"))
    monkeypatch.setattr(execution, "interleaved_seconds", lambda *a, **k: pytest.fail("timed with timing off"))
    info = q.compile_execution("auto", measure=False)
    assert info["used"] == "eager" and info["seconds"] is None and "timing is off" in info["note"]


@pytest.mark.parametrize("value", ["sometimes", 2, "yes"])
def test_bad_compile_value_fails_before_any_work(monkeypatch, value):
    import qgraph.api

    monkeypatch.setattr(qgraph.api, "_graph_of", lambda *a, **k: pytest.fail("traced before checking compile="))
    with pytest.raises(qgraph.errors.OptionError, match="compile must be"):
        qgraph.quantize(_model(), (torch.randn(2, 64),), compile=value)


@pytest.mark.parametrize("value, mode", [(True, "on"), (False, "off"), (None, "off"), ("AUTO", "auto"), ("on", "on")])
def test_compile_values(value, mode):
    assert execution.normalize_mode(value) == mode
