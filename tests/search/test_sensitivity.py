"""Hutchinson traces against Hessians known in closed form; Ω ordering on a real (small) model."""
from __future__ import annotations

import pytest
import torch

from qgraph.search.objectives import EvalConfig, Workbench
from qgraph.search.sensitivity import hessian_sensitivity, hutchinson_traces, proxy_sensitivity
from qgraph.search.space import build_space
from qgraph.target import load_target
from tests.search import write_toy


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops on a busy 2-core machine: one thread avoids OpenMP oversubscription stalls."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


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
    col = [ch.label for ch in space.layers[0].choices].index("bcq2-g128")
    rho = spearmanr([r[col] for r in h.omega], [r[col] for r in p.omega]).statistic
    assert rho >= 0.7, rho
