"""Hutchinson traces against Hessians known in closed form; Ω ordering on a real (small) model."""
from __future__ import annotations

import pytest
import torch

from qgraph.search.objectives import EvalConfig, Workbench
from qgraph.search.sensitivity import hessian_sensitivity, hutchinson_traces, proxy_sensitivity
from qgraph.search.space import build_space
from qgraph.target import load_target
from tests.search import write_toy

pytestmark = pytest.mark.usefixtures("one_thread")


class _Quad(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 5))
        self.u = torch.nn.Parameter(torch.randn(3, 4))


def test_diagonal_hessian_is_exact_and_stops_at_tolerance():
    m = _Quad()
    c = torch.rand(6, 5) + 0.5

    def loss(mod):  # H_w = diag(2c), H_u = 2I (cross terms zero)
        return (c * mod.w ** 2).sum() + (mod.u ** 2).sum()

    traces, iters, converged = hutchinson_traces(m, {"w": m.w, "u": m.u}, loss, tol=1e-3, max_iter=50)
    assert converged and iters == 2  # Rademacher vᵀDv = tr(D) exactly for diagonal D
    assert traces["w"] == pytest.approx(float(2 * c.sum()), rel=1e-6)
    assert traces["u"] == pytest.approx(24.0, rel=1e-6)


def test_dense_hessian_trace_within_sampling_error():
    torch.manual_seed(0)
    x = torch.randn(32, 5)
    m = _Quad()

    def loss(mod):  # L = ½‖W Xᵀ‖²: H_w = I_6 ⊗ XᵀX, tr = 6‖X‖_F²
        return 0.5 * ((x @ mod.w.T) ** 2).sum()

    traces, iters, converged = hutchinson_traces(m, {"w": m.w}, loss, tol=1e-6, max_iter=80, seed=3)
    exact = 6 * float((x ** 2).sum())  # per-sample relative std ≈ 9% here, so 80 samples: ≈ 1%
    assert not converged and iters == 80
    assert traces["w"] == pytest.approx(exact, rel=0.05)


def test_loss_in_parts_gives_the_traces_of_the_whole_loss():
    """One part per batch (one double-backward graph alive at a time) = the summed loss, same probe vectors."""
    torch.manual_seed(1)
    xs = [torch.randn(8, 5) for _ in range(3)]
    m = _Quad()

    def part(x):
        return lambda mod: ((torch.tanh(x @ mod.w.T)[:, :4] @ mod.u.T) ** 2).sum() / 3

    whole = hutchinson_traces(m, {"w": m.w, "u": m.u}, lambda mod: sum(part(x)(mod) for x in xs), tol=0, max_iter=6,
                              seed=2)
    parts = hutchinson_traces(m, {"w": m.w, "u": m.u}, [part(x) for x in xs], tol=0, max_iter=6, seed=2)
    assert whole[1] == parts[1] == 6
    for k in ("w", "u"):
        assert parts[0][k] == pytest.approx(whole[0][k], rel=1e-5)
    assert abs(whole[0]["w"]) > 1e-3  # a real, non-diagonal Hessian


def test_requires_grad_flags_restored():
    m = _Quad()
    m.u.requires_grad_(False)
    hutchinson_traces(m, {"w": m.w}, lambda mod: (mod.w ** 2).sum(), max_iter=3)
    assert m.w.requires_grad and not m.u.requires_grad


@pytest.fixture(scope="module")
def toy_bench(tmp_path_factory):
    spec = write_toy(tmp_path_factory.mktemp("toy"))
    bench = Workbench(EvalConfig(spec, "x86-avx2"))
    return bench, build_space(bench.graph, load_target("x86-avx2"))


@pytest.mark.parametrize("method", ["hessian", "proxy"])
def test_omega_grows_as_bits_shrink(toy_bench, method):
    bench, space = toy_bench
    if method == "hessian":
        sens = hessian_sensitivity(bench, space, max_iter=6)
        assert all(v > 0 for v in sens.traces.values())
    else:
        sens = proxy_sensitivity(bench, space)
    for i, layer in enumerate(space.layers):
        labels = [ch.label for ch in layer.choices]
        om = dict(zip(labels, sens.omega[i]))
        assert om["fp32"] == 0.0
        chain = [om[f"bcq{q}-g128"] for q in (4, 3, 2, 1)]
        assert 0 < om["w8-ch"] < chain[0] and chain == sorted(chain), (layer.key, om)
        act = next(lb for lb in labels if lb.startswith("w8-ch+a"))
        assert om[act] > om["w8-ch"]  # activation quantization adds error


def test_hessian_and_proxy_agree_on_layer_ranking(toy_bench):
    from scipy.stats import spearmanr

    bench, space = toy_bench
    h = hessian_sensitivity(bench, space, max_iter=10)
    p = proxy_sensitivity(bench, space)
    # uniform codes: weighted BCQ reads activation statistics now, which the trace-based Ω does not see
    col = [ch.label for ch in space.layers[0].choices].index("w4-g128")
    rho = spearmanr([r[col] for r in h.omega], [r[col] for r in p.omega]).statistic
    assert rho >= 0.7, rho


def test_anchoring_matches_uniform_losses_and_keeps_layer_order(toy_bench):
    import math

    from qgraph.search.sensitivity import Sensitivity, anchor_sensitivity, metric_loss

    _, space = toy_bench
    raw = Sensitivity("hessian", tuple(tuple(0.0 if ch.is_float else (i + 1) * 2.0 ** (-ch.bits) for ch in layer.choices)
                                       for i, layer in enumerate(space.layers)), {})
    losses = {"bcq3-g128": 0.5, "w8-ch": 0.001, "bcq2-g128": 0.9}
    anchors = {lb: (space.uniform(lb), loss) for lb, loss in losses.items()}
    sens, scales = anchor_sensitivity(raw, space, anchors)
    assert sens.method == "hessian+anchored"
    for a, loss in anchors.values():
        assert sens.total(a) == pytest.approx(2 * loss, rel=1e-9)  # Ω of the uniform strategy = its 2·loss
    assert scales["bcq4-g128"] == pytest.approx(math.sqrt(scales["bcq3-g128"] * scales["bcq2-g128"]))  # family mean
    for i, layer in enumerate(space.layers):
        for c, ch in enumerate(layer.choices):
            assert sens.omega[i][c] == pytest.approx(raw.omega[i][c] * scales.get(ch.label, 0.0))
    assert metric_loss("perplexity", 20.0, 40.0) == pytest.approx(math.log(2)) and metric_loss("cosine", 1.0, 0.9) == \
        pytest.approx(0.1)


def test_local_anchors_match_the_measured_change_around_the_reference(toy_bench):
    from qgraph.search.sensitivity import (
        Sensitivity,
        anchor_sensitivity,
        local_anchor_scales,
        local_probe,
        probe_layers,
        scale_sensitivity,
    )

    _, space = toy_bench
    raw = Sensitivity("hessian", tuple(tuple(0.0 if ch.is_float else (i + 1) * 2.0 ** (-ch.bits) for ch in layer.choices)
                                       for i, layer in enumerate(space.layers)), {})
    labels = ["bcq3-g128", "bcq2-g128", "w8-ch"]
    _, scales = anchor_sensitivity(raw, space, {lb: (space.uniform(lb), 0.1 * (4 - k)) for k, lb in enumerate(labels)})
    ref = space.uniform("bcq3-g128")
    layers = probe_layers(space, share=0.5, seed=1)
    assert layers == probe_layers(space, share=0.5, seed=1) and 1 <= len(layers) < len(space.searchable)
    probes = {lb: local_probe(space, ref, lb, layers) for lb in ("bcq2-g128", "w8-ch")}
    assert all(a is not None and {i for i in range(len(a)) if a[i] != ref[i]} <= set(layers) for a in probes.values())
    assert local_probe(space, ref, "bcq3-g128", layers) is None  # nothing to change
    ref_loss, measured = 0.3, {"bcq2-g128": 0.5, "w8-ch": 0.25}
    new = local_anchor_scales(raw, space, scales, ref, ref_loss, {lb: (a, measured[lb]) for lb, a in probes.items()})
    sens = scale_sensitivity(raw, space, new)
    assert new["bcq3-g128"] == scales["bcq3-g128"]  # the reference's own label keeps its uniform scale
    for lb, a in probes.items():  # the scaled Ω moves by 2x the measured loss change around the reference
        assert sens.total(a) - sens.total(ref) == pytest.approx(2 * (measured[lb] - ref_loss), rel=1e-9, abs=1e-12)
