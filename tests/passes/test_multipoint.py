"""multipoint pass: extra points go to the channels with the largest output error within the budget, the
result beats round-to-nearest, stays float-simulated through lowering, and survives an artifact round trip."""
import pytest
import torch
from torch import nn

import qgraph
from qgraph.artifact import load_artifact, save_artifact
from qgraph.errors import CalibrationError, SpecError
from qgraph.passes.quantize_weights import QWEIGHT_KEY
from qgraph.quant.multipoint import MultipointWeight

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, groups=12), nn.ReLU(),
                         nn.Conv2d(12, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()


def _calib(shape, seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g),) for _ in range(n)]


def _rel(q, model, x):
    with torch.no_grad():
        return float((q(x) - model(x)).square().mean() / model(x).square().mean())


def _run(model, calib, pipe):
    return qgraph.quantize(model, calib[0], calib=calib, pipeline=pipe, progress=False)


@pytest.mark.parametrize("make,shape", [(_mlp, (32, 16)), (_cnn, (4, 3, 8, 8))])
def test_beats_round_to_nearest_within_budget(make, shape):
    model, calib = make(), _calib(shape)
    x = _calib(shape, seed=9, n=1)[0][0]
    ann = "annotate{bits=3,act_bits=0}"
    rtn = _run(model, calib, f"{ann},quantize-weights,insert-fq")
    mp = _run(model, calib, f"{ann},multipoint{{extra=0.5}},quantize-weights,insert-fq")
    st = mp.report["stats"]["multipoint"]
    nodes = [n for n in mp.gm.graph.nodes if isinstance(n.meta.get(QWEIGHT_KEY), MultipointWeight)]
    assert st["layers"] == len(nodes) and st["output_error_layers"] == len(nodes) and st["lowering"] == "float-simulated"
    assert mp.report["stats"]["quantize-weights"]["quantized"] == 0
    for n in nodes:
        q = n.meta[QWEIGHT_KEY]
        c = q.shape[0]
        assert int(q.counts.sum()) <= round(0.5 * c) and int(q.counts.max()) <= 2
    assert st["avg_points"] > 1.3
    rows = [r for r in mp.report["layers"] if r.get("method") == "multipoint"]
    assert all(r["error_ratio"] <= 1.0 and r["rel_weight_err"] <= r["rel_weight_err_rtn"] + 1e-7 for r in rows)
    assert _rel(mp, model, x) < 0.7 * _rel(rtn, model, x)
    assert sum(r["bytes"] for r in rows) > sum(r["rtn_bytes"] for r in rows)


def test_points_go_to_the_channels_with_the_largest_output_error():
    model = nn.Sequential(nn.Linear(8, 6)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.linspace(-1, 1, 48).reshape(6, 8).roll(3, 1) * torch.rand(6, 8))
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.01, 0.01, 0.01, 10.0, 0.01, 0.01])  # only input 3 carries signal
    calib = [(torch.randn(64, 8, generator=g) * scale[torch.arange(8) % 6],) for _ in range(2)]
    q = _run(model, calib, "annotate{bits=2,act_bits=0},multipoint{extra=0.34,max_points=2}")
    node = next(n for n in q.gm.graph.nodes if QWEIGHT_KEY in n.meta)
    counts = node.meta[QWEIGHT_KEY].counts
    w = model[0].weight.detach()
    base = node.meta[QWEIGHT_KEY].base.dequantize()
    x = torch.cat([b[0] for b in calib])
    out_err = ((x @ (w - base).T) ** 2).sum(0)
    assert int(counts.sum()) == 2
    assert set(torch.nonzero(counts).flatten().tolist()) == set(out_err.topk(2).indices.tolist())


def test_lowering_keeps_multipoint_layers_simulated_and_artifact_round_trips(tmp_path):
    model, calib = _mlp(1), _calib((16, 16), seed=1)
    pipe = "annotate{act_bits=7},calibrate,multipoint{extra=0.25},quantize-weights,insert-fq,lower-int8,dce"
    q = _run(model, calib, pipe)
    rows = q.report["lowering"]
    assert len(rows) == 3 and all(r["status"] == "float" and "MultipointWeight" in r["reason"] for r in rows)
    x = calib[0][0]
    save_artifact(q, tmp_path / "mp")
    back = load_artifact(tmp_path / "mp", model, calib[0])
    with torch.no_grad():
        torch.testing.assert_close(back(x), q(x), rtol=0, atol=1e-6)


def test_typed_errors():
    model, calib = _mlp(), _calib((8, 16))
    with pytest.raises(CalibrationError, match="error=weight"):
        qgraph.quantize(model, calib[0], pipeline="annotate{bits=3,act_bits=0},multipoint", progress=False)
    q = qgraph.quantize(model, calib[0], pipeline="annotate{bits=3,act_bits=0},multipoint{error=weight},"
                        "quantize-weights,insert-fq", progress=False)
    assert q.report["stats"]["multipoint"]["output_error_layers"] == 0
    with pytest.raises(SpecError, match="BCQ"):
        _run(model, calib, "annotate{scheme=bcq,bits=2,group_size=16},multipoint")
