"""quantize-weights: BCQ importance from activation statistics, and the warning against round-to-nearest."""
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qgraph
from qgraph import CalibrationError
from qgraph.passes.quantize_weights import QWEIGHT_KEY
from qgraph.quant.bcq import bcq_objective, quantize_bcq
from qgraph.quant.importance import ChannelMoments, activation_importance, relative_output_error

BCQ3 = "annotate{scheme=bcq,bits=3,group_size=32,method=weighted}"


def _sink_model(seed=0, k=64, n=48):
    """One Linear whose input has a few 'attention sink' channels with huge values on some rows; the weight
    columns reading them are small (their product must stay small), as in SmolLM2's v_proj."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=False)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, :3] *= 0.02
    lin.weight.data.copy_(w)
    return nn.Sequential(lin).eval()


def _sink_inputs(seed, rows=64, k=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[::8, :3] = 300.0 * torch.sign(torch.randn(rows // 8, 3, generator=g))
    return x


def _quantize(model, pipeline, calib=None):
    x = _sink_inputs(99)
    return qgraph.quantize(model, (x,), calib=calib, progress=False, pipeline=pipeline)


def _out_err(q, model):
    x = _sink_inputs(1234)
    node = next(n for n in q.graph.nodes() if q.graph.meta(n).get(QWEIGHT_KEY) is not None)
    w_hat = q.graph.meta(node)[QWEIGHT_KEY].dequantize()
    w = model[0].weight.detach()
    return relative_output_error(x, w, w_hat)


def test_activation_importance_beats_magnitude_on_sink_channels():
    """Regression (issue 22): with calibration data, weighted BCQ reads the activation statistics; magnitude
    importance (today's data-free default) is far worse on the sink rows' output."""
    model = _sink_model()
    calib = [(_sink_inputs(s),) for s in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        act = _quantize(model, f"{BCQ3},quantize-weights,insert-fq", calib)
        mag = _quantize(model, f"{BCQ3},quantize-weights{{bcq_importance=spec}},insert-fq", calib)
    assert act.report["stats"]["quantize-weights"]["activation_importance"] == 1
    e_act, e_mag = _out_err(act, model), _out_err(mag, model)
    assert e_act < 0.5 * e_mag, (e_act, e_mag)
    layer = next(r for r in act.report["layers"] if r.get("importance") == "activation")
    assert layer["rel_output_err"] <= layer["rtn_output_err"], layer


def test_warns_when_bcq_output_error_exceeds_rtn():
    model = _sink_model()
    with pytest.warns(UserWarning, match=r"quantize-weights: 1 BCQ layer\(s\).*more than 2x.*0"):
        q = _quantize(model, f"{BCQ3},quantize-weights{{bcq_importance=spec}},insert-fq")
    assert q.report["quantize-weights"]["flagged"] == ["0"]
    row = q.report["layers"][-1]
    assert max(row["rel_output_err"] / row["rtn_output_err"],
               row["worst_token_err"] / row["rtn_worst_token_err"]) > 2
    # with calibration statistics the same layer passes the check, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = _quantize(model, f"{BCQ3},quantize-weights,insert-fq", [(_sink_inputs(s),) for s in range(2)])
    assert q.report["quantize-weights"]["flagged"] == []


def test_check_can_be_turned_off_and_activation_needs_data():
    model = _sink_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = _quantize(model, f"{BCQ3},quantize-weights{{bcq_importance=spec,rtn_check=0}},insert-fq")
    assert "rtn_flagged" not in q.report["stats"]["quantize-weights"]
    with pytest.raises(CalibrationError, match="bcq_importance=activation needs calibration data"):
        _quantize(model, f"{BCQ3},quantize-weights{{bcq_importance=activation}},insert-fq")


def test_channel_moments_and_importance():
    m = ChannelMoments()
    x = torch.randn(3, 5, 7)
    m.add(x[:2])
    m.add(x[2:])
    torch.testing.assert_close(m.mean_square(), x.reshape(-1, 7).double().square().mean(0))
    imp = activation_importance(torch.randn(4, 7), torch.tensor([0.0, 1, 2, 3, 4, 5, 6]))
    assert imp.shape == (4, 7) and bool((imp > 0).all()) and float(imp[0, 6]) == 6.0
    with pytest.raises(CalibrationError):
        ChannelMoments().mean_square()


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([2, 3, 4]), st.sampled_from([8, 16, 24]), st.booleans())
def test_activation_weighted_bcq_never_worse_than_greedy_on_its_objective(seed, bits, group, offset):
    """Σ_k E[x_k²] (w − ŵ)² of activation-weighted BCQ is at most greedy BCQ's (same planes and groups), for
    inputs with outlier channels; and its output error on those inputs is at most greedy's plus a margin."""
    g = torch.Generator().manual_seed(seed)
    k = 48
    w = torch.randn(12, k, generator=g)
    scale = torch.ones(k)
    scale[torch.randint(0, k, (3,), generator=g)] = 50.0
    x = torch.randn(256, k, generator=g) * scale
    mom = ChannelMoments()
    mom.add(x)
    imp = activation_importance(w, mom.mean_square())
    ours = quantize_bcq(w, bits, group, method="weighted", importance=imp, offset=offset)
    greedy = quantize_bcq(w, bits, group, method="greedy", offset=offset)
    assert bcq_objective(w, ours, imp) <= bcq_objective(w, greedy, imp) * (1 + 1e-6) + 1e-9


def _outlier_mlp(seed=0, k=64, h=96):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(k, h), nn.GELU(), nn.Linear(h, 32)).eval()


def _outlier_inputs(seed, rows=32, k=64):
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(k)
    scale[[3, 17, 40]] = 40.0  # a few outlier channels, as in BERT's hidden states
    return torch.randn(rows, k, generator=g) * scale


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_bcq2_with_calibration_beats_greedy(seed):
    """Regression (issue 22: MiniLM BCQ-2 weighted 0.137 cosine vs greedy 0.614): given calibration data,
    2-bit weighted BCQ's model output error is below greedy's on inputs with outlier channels."""
    model = _outlier_mlp(seed)
    calib = [(_outlier_inputs(s),) for s in range(4)]
    x = _outlier_inputs(100 + seed, rows=128)
    with torch.no_grad():
        ref = model(x)
    errs = {}
    for method in ("greedy", "weighted"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = qgraph.quantize(model, (x[:8],), calib=calib, progress=False,
                                pipeline=f"annotate{{scheme=bcq,bits=2,group_size=32,method={method}}},"
                                         "quantize-weights,insert-fq")
        with torch.no_grad():
            errs[method] = float((q(x) - ref).norm() / ref.norm())
    assert errs["weighted"] < 0.8 * errs["greedy"], errs
