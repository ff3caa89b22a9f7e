"""lower-bcq picks its kernel mode from the verify tolerance and says which one it chose."""
import pytest
import torch
from torch import nn

import qgraph
from qgraph.errors import PipelineError


def _lower(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16)).eval()
    x = torch.randn(8, 64)
    return qgraph.quantize(model, (x,), target="x86-avx2", progress=False,
                           pipeline=qgraph.api.lowering_pipeline("scheme=bcq,bits=3,group_size=64", **kw))


def _modes(q):
    return {m.mode for m in q.gm.modules() if type(m).__name__ == "BCQLinear"}


def test_default_tolerance_keeps_exact_mode():
    q = _lower()
    assert _modes(q) == {"exact"} and q.report["lower-bcq"]["mode"] == "exact"
    assert "below fast mode" in q.report["lower-bcq"]["reason"]
    assert q.report["verify"]["output_rel_err"] <= 1e-4


def test_a_loose_tolerance_takes_fast_mode_and_verify_holds():
    q = _lower(verify_tol=0.05)
    assert _modes(q) == {"fast"} and q.report["lower-bcq"]["mode"] == "fast"
    assert all("mode=fast" in r["reason"] for r in q.report["lowering"] if r["kernel"] == "biqgemm")
    assert 0 < q.report["verify"]["output_rel_err"] <= 0.05


def test_an_explicit_mode_wins_and_a_bad_tolerance_fails_at_parse():
    assert qgraph.PassManager("lower-bcq{mode=fast,tol=0}").passes[0].choose_mode() == ("fast", "asked for")
    with pytest.raises(PipelineError):
        qgraph.PassManager("lower-bcq{tol=-1}")
