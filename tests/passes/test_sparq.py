"""sparq pass: rewrites insert-fq's activation fake quants to the SPARQ window, beats plain 4-bit activations,
lowers to int8 exactly, replays from an artifact; typed errors."""
import pytest
import torch
from torch import nn

import qgraph
from qgraph.artifact import load_artifact, save_artifact
from qgraph.errors import PipelineError
from qgraph.quant.sparq import sparq_fake_quantize

pytestmark = pytest.mark.usefixtures("one_thread")


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 10)).eval()


def _calib(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g),) for _ in range(n)]


def _run(model, calib, pipe):
    return qgraph.quantize(model, calib[0], calib=calib, pipeline=pipe, progress=False)


def _rel(q, model, x):
    with torch.no_grad():
        return float((q(x) - model(x)).square().mean() / model(x).square().mean())


CANON = "fold-bn,dce,fuse-activation"


@pytest.mark.parametrize("mode", ["bsparq", "vsparq"])
def test_sparq_window_beats_plain_4_bit_activations(mode):
    model, calib = _cnn(), _calib()
    x = _calib(5, n=1)[0][0]
    a8 = _run(model, calib, f"{CANON},annotate{{act_bits=8}},calibrate,quantize-weights,insert-fq")
    a4 = _run(model, calib, f"{CANON},annotate{{act_bits=4}},calibrate,quantize-weights,insert-fq")
    sp = _run(model, calib, f"{CANON},annotate{{act_bits=8}},calibrate,quantize-weights,insert-fq,sparq{{mode={mode}}}")
    assert sp.report["stats"]["sparq"]["activations"] == 3
    fqs = [n for n in sp.gm.graph.nodes if n.target is sparq_fake_quantize]
    assert len(fqs) == 3 and [n.args[5:9] for n in fqs] == [(4, mode, True, 1)] * 2 + [(4, mode, True, -1)]
    e8, e4, es = _rel(a8, model, x), _rel(a4, model, x), _rel(sp, model, x)
    assert e8 < es < 0.5 * e4


def test_lowered_int8_runs_the_sparq_codes_exactly():
    model, calib = _cnn(1), _calib(1)
    pipe = f"{CANON},annotate{{act_bits=7}},calibrate,quantize-weights,insert-fq,sparq{{bits=3}},lower-int8,dce,verify"
    q = _run(model, calib, pipe)
    assert q.report["stats"]["lower-int8"]["lowered"] == 3
    assert q.report["stats"]["verify"]["output_rel_err"] < 1e-5
    plain = _run(model, calib, pipe.replace("sparq{bits=3},", ""))
    x = calib[0][0]
    with torch.no_grad():
        assert float((q(x) - plain(x)).abs().max()) > 1e-3  # the window did change the codes


def test_artifact_replays_sparq(tmp_path):
    model, calib = _cnn(2), _calib(2)
    q = _run(model, calib, f"{CANON},annotate{{act_bits=8}},calibrate,quantize-weights,insert-fq,"
                           f"sparq{{mode=vsparq,rounding=false}}")
    save_artifact(q, tmp_path / "sp")
    back = load_artifact(tmp_path / "sp", model, calib[0])
    x = calib[1][0]
    with torch.no_grad():
        torch.testing.assert_close(back(x), q(x), rtol=0, atol=0)


def test_typed_errors_and_notes():
    model, calib = _cnn(), _calib()
    with pytest.raises(PipelineError, match="insert-fq"):
        _run(model, calib, f"{CANON},annotate{{act_bits=0}},quantize-weights,insert-fq,sparq")
    with pytest.raises(PipelineError, match="placement"):
        _run(model, calib, f"{CANON},annotate{{act_bits=8}},calibrate,quantize-weights,insert-fq,sparq{{shifts=[0,2]}}")
    q = _run(model, calib, f"{CANON},annotate{{act_bits=4}},calibrate,quantize-weights,insert-fq,sparq")
    assert q.report["stats"]["sparq"]["activations"] == 0 and q.report["stats"]["sparq"]["skipped"] == 3
    assert "fit a 4-bit window" in q.report["sparq"]["notes"][0]
