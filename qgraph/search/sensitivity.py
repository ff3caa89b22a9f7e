"""Per-layer sensitivity Ω_i(c): how much quantizing layer i with choice c is expected to hurt.

- ``hessian`` (HAWQ-v2 style): Hutchinson estimates of tr(H_i), the trace of the Hessian of the loss
  w.r.t. layer i's weight. Each iteration draws one Rademacher vector v over all searched weights, gets
  H·v by double backward (Pearlmutter), and adds v_iᵀ(Hv)_i to layer i's running mean (the cross-block
  terms have zero mean); it stops once every running mean changed by less than ``tol`` (relative) in an
  iteration, or after ``max_iter``. Then Ω_i(c) = tr(H_i)/n_i · ‖Q_c(W_i) − W_i‖², which is ≈ 2·ΔL by a
  second-order expansion around the float weights. Choices that also quantize the input activation add
  the measured 2·ΔL of quantizing only that activation.
- ``proxy`` (no gradients needed): Ω_i(c) = 2·ΔL measured by quantizing layer i alone, one forward pass
  per (layer, choice).

The loss is the workbench's distance to the float output (1 − cosine, or KL to the float next-token
distribution), so it is zero at the float weights. The graph must be differentiable for ``hessian``;
scaled-dot-product attention is forced onto its math kernel, whose backward is twice differentiable.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qgraph.quant.qspec import Annotation
from qgraph.search.objectives import Workbench, make_loss_fn
from qgraph.search.space import SearchError, Space
from qgraph.search.strategy import Strategy

PROBE_PIPELINE = "annotate,quantize-weights,insert-fq"


@dataclass(frozen=True)
class Sensitivity:
    """Ω per layer and choice (float choices are 0), and how it was obtained."""

    method: str
    omega: tuple[tuple[float, ...], ...]
    traces: dict[str, float]
    iterations: int = 0
    converged: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "omega": [list(r) for r in self.omega], "traces": self.traces,
                "iterations": self.iterations, "converged": self.converged, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sensitivity:
        return cls(d["method"], tuple(tuple(float(x) for x in r) for r in d["omega"]),
                   {k: float(v) for k, v in d["traces"].items()}, int(d["iterations"]), bool(d["converged"]),
                   float(d["seconds"]))

    def total(self, a) -> float:
        return sum(self.omega[i][c] for i, c in enumerate(a))


@contextlib.contextmanager
def _grad_only(params: list[torch.Tensor], module: torch.nn.Module):
    """Only ``params`` require grad inside; every flag is restored afterwards."""
    everything = list(module.parameters())
    saved = [(p, p.requires_grad) for p in everything] + [(p, p.requires_grad) for p in params]
    try:
        for p in everything:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _math_attention():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()


def hutchinson_traces(module: torch.nn.Module, params: dict[str, torch.Tensor],
                      loss_fn: Callable[[torch.nn.Module], torch.Tensor], *, tol: float = 1e-3,
                      max_iter: int = 30, min_iter: int = 2, seed: int = 0,
                      on_iter: Callable[[int], None] | None = None) -> tuple[dict[str, float], int, bool]:
    """Hutchinson estimates of tr(∂²L/∂W_k²) for every tensor in ``params``.

    Returns (trace per name, iterations run, converged: every running mean moved < ``tol`` relative)."""
    names = list(params)
    tensors = [params[n] for n in names]
    gen = torch.Generator().manual_seed(seed)
    means = [0.0] * len(names)
    converged = False
    it = 0
    with _grad_only(tensors, module), _math_attention():
        for it in range(1, max_iter + 1):
            loss = loss_fn(module)
            grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
            vs = [torch.randint(0, 2, t.shape, generator=gen).to(t.dtype) * 2 - 1 for t in tensors]
            used = [(g, v, t) for g, v, t in zip(grads, vs, tensors) if g is not None and g.requires_grad]
            if not used:
                break
            gv = sum((g * v).sum() for g, v, _ in used)
            hv = torch.autograd.grad(gv, [t for _, _, t in used], allow_unused=True)
            hv_by_id = {id(t): h for (_, _, t), h in zip(used, hv)}
            worst = 0.0
            for k, (t, v) in enumerate(zip(tensors, vs)):
                h = hv_by_id.get(id(t))
                est = float((h * v).sum()) if h is not None else 0.0
                new = means[k] + (est - means[k]) / it
                if it > 1:
                    worst = max(worst, abs(new - means[k]) / max(abs(means[k]), 1e-30))
                means[k] = new
            if on_iter is not None:
                on_iter(it)
            if it >= min_iter and worst < tol:
                converged = True
                break
    return dict(zip(names, means)), it, converged


def _float_strategy(space: Space) -> Strategy:
    return Strategy({layer.key: Annotation(fallback_float=True) for layer in space.layers}, space.target)


def _probe_loss(bench: Workbench, space: Space, key: str, ann: Annotation) -> float:
    """Loss with only node ``key`` quantized by ``ann`` (everything else float)."""
    g = bench.apply(_float_strategy(space).replace(**{key: ann}), pipeline=PROBE_PIPELINE)
    with torch.no_grad():
        return float(make_loss_fn(bench)(g.gm))


@contextlib.contextmanager
def _swapped_weight(graph: Any, node_name: str, value: torch.Tensor):
    w = graph.param(graph.find(node_name), "weight")
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.copy_(value.reshape(w.shape).to(w.dtype))
        yield
    finally:
        with torch.no_grad():
            w.copy_(saved)


def _sq_error(bench: Workbench, node_name: str, spec: Any) -> tuple[float, torch.Tensor]:
    from qgraph.passes.quantize_weights import dequantized

    w = bench.graph.param(bench.graph.find(node_name), "weight").detach()
    deq = dequantized(bench.qweight(node_name, spec), w)
    return float(((deq - w).double() ** 2).sum()), deq


def _act_terms(bench: Workbench, space: Space, progress: Callable[[str], None] | None) -> dict[tuple[int, str], float]:
    """2·ΔL of quantizing only the input activation, per (layer, act spec) offered."""
    out: dict[tuple[int, str], float] = {}
    for i in space.searchable:
        layer = space.layers[i]
        for act in {str(ch.act): ch.act for ch in layer.choices if ch.act is not None}.values():
            out[(i, str(act))] = 2.0 * _probe_loss(bench, space, layer.key, Annotation(inputs={0: act}))
    if progress and out:
        progress(f"activation terms for {len(out)} (layer, spec) pairs")
    return out


def layer_traces(bench: Workbench, space: Space, *, tol: float = 1e-3, max_iter: int = 30, seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Hutchinson tr(H_i) of every searched layer's weight: ``{"traces", "iterations", "converged"}``."""
    graph = bench.graph
    params = {space.layers[i].key: graph.param(graph.find(space.layers[i].node), "weight") for i in space.searchable}
    step = (lambda k: progress(f"hutchinson iteration {k}/{max_iter}")) if progress else None
    traces, iters, converged = hutchinson_traces(graph.gm, params, make_loss_fn(bench), tol=tol,
                                                 max_iter=max_iter, seed=seed, on_iter=step)
    return {"traces": traces, "iterations": iters, "converged": converged}


def hessian_sensitivity(bench: Workbench, space: Space, *, tol: float = 1e-3, max_iter: int = 30, seed: int = 0,
                        progress: Callable[[str], None] | None = None,
                        traces: dict[str, Any] | None = None) -> Sensitivity:
    """Ω from Hutchinson traces (see the module docstring); ``traces``: a `layer_traces` result to reuse
    (they depend on the model and loss only, not on the target)."""
    t0 = time.perf_counter()
    idx = space.searchable
    if traces is None or any(space.layers[i].key not in traces["traces"] for i in idx):
        traces = layer_traces(bench, space, tol=tol, max_iter=max_iter, seed=seed, progress=progress)
    iters, converged = traces["iterations"], traces["converged"]
    traces = traces["traces"]
    acts = _act_terms(bench, space, progress)
    omega = []
    per_elem = {}
    for i, layer in enumerate(space.layers):
        row = []
        t = max(traces.get(layer.key, 0.0), 0.0) / max(layer.numel, 1)
        per_elem[layer.key] = t
        for ch in layer.choices:
            if ch.is_float or i not in idx:
                row.append(0.0)
                continue
            w_term = t * _sq_error(bench, layer.node, ch.weight)[0] if ch.weight is not None else 0.0
            a_term = acts.get((i, str(ch.act)), 0.0) if ch.act is not None else 0.0
            row.append(w_term + a_term)
        omega.append(tuple(row))
    return Sensitivity("hessian", tuple(omega), per_elem, iters, converged, time.perf_counter() - t0)


def proxy_sensitivity(bench: Workbench, space: Space, progress: Callable[[str], None] | None = None) -> Sensitivity:
    """Ω = 2·ΔL of quantizing one layer at a time (one forward per (layer, choice); no gradients)."""
    t0 = time.perf_counter()
    loss_fn = make_loss_fn(bench)
    omega = []
    for i, layer in enumerate(space.layers):
        row = []
        for ch in layer.choices:
            if ch.is_float or i not in space.searchable:
                row.append(0.0)
            elif ch.act is not None:
                row.append(2.0 * _probe_loss(bench, space, layer.key, ch.annotation))
            else:
                _, deq = _sq_error(bench, layer.node, ch.weight)
                with _swapped_weight(bench.graph, layer.node, deq), torch.no_grad():
                    row.append(2.0 * float(loss_fn(bench.graph.gm)))
        omega.append(tuple(row))
        if progress:
            progress(f"proxy sensitivity {i + 1}/{len(space.layers)}")
    return Sensitivity("proxy", tuple(omega), {}, 0, True, time.perf_counter() - t0)


def compute_sensitivity(bench: Workbench, space: Space, method: str = "hessian", *, tol: float = 1e-3,
                        max_iter: int = 30, seed: int = 0, progress: Callable[[str], None] | None = None,
                        traces: dict[str, Any] | None = None) -> Sensitivity:
    """``hessian`` (falls back to ``proxy`` when the graph cannot be differentiated twice) or ``proxy``."""
    if method == "proxy":
        return proxy_sensitivity(bench, space, progress)
    if method != "hessian":
        raise SearchError(f"unknown sensitivity method {method!r}; use 'hessian' or 'proxy'")
    try:
        return hessian_sensitivity(bench, space, tol=tol, max_iter=max_iter, seed=seed, progress=progress,
                                   traces=traces)
    except RuntimeError as e:
        if progress:
            progress(f"hessian sensitivity failed ({str(e).splitlines()[0][:120]}); using the proxy")
        return proxy_sensitivity(bench, space, progress)
