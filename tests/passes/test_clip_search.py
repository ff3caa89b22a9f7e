"""clip-search: never worse than its start on the calibration loss (joint and Q-Rater modes), hands its
ranges to quantize-weights / insert-fq / lower-int8, typed errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qgraph
from qgraph.errors import CalibrationError, PipelineError, SpecError
from qgraph.passes.calibrate import QPARAMS_KEY
from qgraph.passes.quantize_weights import QWEIGHT_KEY
from qgraph.quant.qtensor import UniformWeight

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed, width=24, depth=2):
    torch.manual_seed(seed)
    layers, k = [], 12
    for _ in range(depth):
        layers += [nn.Linear(k, width), nn.ReLU()]
        k = width
    return nn.Sequential(*layers, nn.Linear(k, 6)).eval()


def _calib(seed, n=3, rows=16):
    g = torch.Generator().manual_seed(seed + 100)
    return [(torch.randn(rows, 12, generator=g) * torch.rand(12, generator=g) * 3,) for _ in range(n)]


def _calib_loss(q, model, calib, kind="mse"):
    """The pass's calibration loss, computed here from the finished model."""
    total = 0.0
    with torch.no_grad():
        for (x,) in calib:
            a, b = q(x), model(x)
            if kind == "kl":
                p = b.log_softmax(-1)
                total += float((p.exp() * (p - a.log_softmax(-1))).sum(-1).mean())
            else:
                total += float((a - b).square().mean() / b.square().mean())
    return total / len(calib)


def _run(model, calib, annotate, search):
    pipe = f"{annotate},calibrate,{search + ',' if search else ''}quantize-weights,insert-fq"
    return qgraph.quantize(model, calib[0], calib=calib, pipeline=pipe, progress=False)


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 1000), st.sampled_from(["clip-search{evals=25,holdout=0}",
                                              "clip-search{evals=25,qrater=true,holdout=0}",
                                              "clip-search{evals=25,method=powell,holdout=0}",
                                              "clip-search{evals=15,loss=kl,holdout=0}"]),
       st.sampled_from(["annotate{bits=3,act_bits=4}", "annotate{bits=4,act_bits=0}",
                        "annotate{bits=2,granularity=tensor,act_bits=6}"]))
def test_never_worse_than_the_start(seed, search, annotate):
    model, calib = _mlp(seed, depth=1 + seed % 2), _calib(seed)
    kind = "kl" if "kl" in search else "mse"
    plain = _calib_loss(_run(model, calib, annotate, ""), model, calib, kind)
    start = _run(model, calib, annotate, search.replace("evals=25", "evals=0").replace("evals=15", "evals=0"))
    q = _run(model, calib, annotate, search)
    st_ = q.report["stats"]["clip-search"]
    got = _calib_loss(q, model, calib, kind)
    assert got == pytest.approx(st_["loss"], rel=1e-4, abs=1e-9)  # the pass measures what it returns
    assert st_["loss_minmax"] == pytest.approx(plain, rel=1e-4, abs=1e-9)  # min/max start = the plain pipeline
    assert got <= plain * (1 + 1e-6) + 1e-9
    assert got <= _calib_loss(start, model, calib, kind) * (1 + 1e-6) + 1e-9
    assert got <= min(st_["loss_lp"], st_["loss_start"]) * (1 + 1e-6) + 1e-9
    assert st_["evals"] <= (25 if "evals=25" in search else 15) + 5


def test_search_improves_on_a_model_with_outliers_and_hands_over_its_ranges():
    model, calib = _mlp(7), _calib(7, n=4)
    with torch.no_grad():
        model[0].weight[0, 0] = 4.0  # one outlier weight: min/max ranges waste most levels
    q = _run(model, calib, "annotate{bits=3,act_bits=4}", "clip-search{evals=80}")
    st_ = q.report["stats"]
    cs = st_["clip-search"]
    assert cs["weights"] == 3 and cs["activations"] == 3
    assert cs["loss"] < 0.8 * cs["loss_minmax"]
    assert st_["quantize-weights"]["quantized"] == 0  # every weight came from clip-search
    nodes = [n for n in q.gm.graph.nodes if QWEIGHT_KEY in n.meta]
    assert len(nodes) == 3 and all(isinstance(n.meta[QWEIGHT_KEY], UniformWeight) for n in nodes)
    rows = q.report["clip_search"]["units"]
    assert {r["unit"] for r in rows} == {"weight", "input0"}
    assert any(r["range_vs_calibrate"] != pytest.approx(1.0) for r in rows if r["unit"] == "input0")
    # the activation qparams the simulation uses are the chosen ones
    fq = [n for n in q.gm.graph.nodes if "fake_quantize" in str(n.target)]
    chosen = [tuple(n.meta[QPARAMS_KEY]["input0"]) for n in q.gm.graph.nodes if QPARAMS_KEY in n.meta]
    assert sorted(float(n.args[1]) for n in fq) == pytest.approx(sorted(float(s) for s, _ in chosen))


def test_qrater_searches_the_rounding_threshold():
    model, calib = _mlp(3), _calib(3, n=4)
    q = _run(model, calib, "annotate{bits=2,act_bits=0}", "clip-search{evals=90,qrater=true}")
    cs = q.report["stats"]["clip-search"]
    assert cs["mode"] == "qrater" and cs["loss"] <= min(cs["loss_lp"], cs["loss_minmax"])
    ts = [r["rounding"] for r in q.report["clip_search"]["units"] if r["unit"] == "weight"]
    assert all(0.3 <= t <= 0.7 for t in ts)


def test_lowered_int8_model_matches_its_simulation():
    model, calib = _mlp(2), _calib(2)
    pipe = "annotate{act_bits=7},calibrate,clip-search{evals=20},quantize-weights,insert-fq,lower-int8,verify"
    q = qgraph.quantize(model, calib[0], calib=calib, pipeline=pipe, progress=False)
    assert q.report["stats"]["lower-int8"]["lowered"] == 3
    assert q.report["stats"]["verify"]["output_rel_err"] < 1e-5


def test_typed_errors():
    model, calib = _mlp(0), _calib(0)
    with pytest.raises(CalibrationError, match="calib"):
        qgraph.quantize(model, calib[0], pipeline="annotate{bits=4,act_bits=0},clip-search", progress=False)
    with pytest.raises(SpecError, match="BCQ"):
        _run(model, calib, "annotate{scheme=bcq,bits=2,group_size=12,act_bits=0}", "clip-search")
    # BCQ weights with quantized activations: the activations are searched, the weights left to quantize-weights
    q = _run(model, calib, "annotate{scheme=bcq,bits=2,granularity=channel,act_bits=8}", "clip-search{evals=4}")
    assert q.report["stats"]["clip-search"]["weights"] == 0
    assert q.report["stats"]["clip-search"]["activations"] == 3
    assert q.report["stats"]["quantize-weights"]["quantized"] == 3


def test_held_out_batches_undo_a_search_that_overfits():
    """Regression (issue 22): the search fits the batches it sees. Here they hold small inputs and the last
    batch large ones; the held-out batch must keep the model no worse than round-to-nearest there, where the
    search alone (holdout=0) is far worse."""
    model = _mlp(5)
    g = torch.Generator().manual_seed(5)
    calib = [(torch.randn(16, 12, generator=g) * 0.2,) for _ in range(3)] + [(torch.randn(16, 12, generator=g) * 4,)]
    held = calib[-1:]
    annotate = "annotate{bits=4,act_bits=4}"
    rtn = _calib_loss(_run(model, calib, annotate, ""), model, held)
    alone = _run(model, calib, annotate, "clip-search{evals=60,holdout=0,max_batches=3}")  # same search batches
    q = _run(model, calib, annotate, "clip-search{evals=60}")
    cs = q.report["stats"]["clip-search"]
    assert cs["batches"] == 3 and cs["holdout_batches"] == 1
    assert cs["kept"] in ("minmax", "start", "result")
    got = _calib_loss(q, model, held)
    assert got == pytest.approx(cs[f"holdout_loss_{cs['kept']}"], rel=1e-4)
    assert got <= rtn * (1 + 1e-6)
    assert _calib_loss(alone, model, held) > 2 * got  # what the held-out split prevented


def test_holdout_is_validated():
    with pytest.raises(PipelineError, match="holdout"):
        qgraph.PassManager("clip-search{holdout=1.5}")
