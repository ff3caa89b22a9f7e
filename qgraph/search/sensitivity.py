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

A Hessian's trace at the float weights (a minimum of the loss) is ≥ 0; a layer whose estimate is ≤ 0
after the iterations run is below the estimator's noise: it gets the median positive per-element trace of
the other layers (unknown is taken as typical) instead of 0, which would make every choice look free on
it (on SmolLM2 with 8 iterations, 22 of 210 layers — q/k projections — come out ≤ 0, and 2-bit weights
there are far from free).

Anchoring: Ω adds per-layer second-order terms, but some schemes' errors add up across layers far
faster than their size says (BCQ's least-squares fit shrinks weights, coherently in every layer: on
SmolLM2 uniform BCQ-3 has 0.65x the squared error of uniform int3 and 20x the perplexity). Measured
strategies give each choice label L a scale s_L on its Ω entries (layers keep their relative
sensitivities): `anchor_sensitivity` from uniform strategies, s_L = 2·loss(uniform L) / Σ_i Ω_i(L); then
`local_anchor_scales` around a reference strategy R at the limits (the best uniform one that meets
them): L applied to a spread subset S of layers on top of R, s_L such that the change of the scaled Ω
equals 2·(loss(R with L on S) − loss(R)). The local form stays in the regime the search works in (a
whole-model 2-bit strategy saturates the metric, a quarter of the layers on top of a 3-bit one does not).

The loss is the workbench's distance to the float output (1 − cosine, or KL to the float next-token
distribution), so it is zero at the float weights. The graph must be differentiable for ``hessian``;
scaled-dot-product attention is forced onto its math kernel, whose backward is twice differentiable.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qgraph.quant.qspec import Annotation
from qgraph.search.objectives import Workbench, make_loss_fn, make_loss_parts
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
                      loss_fn: Callable[[torch.nn.Module], torch.Tensor]
                      | Sequence[Callable[[torch.nn.Module], torch.Tensor]], *, tol: float = 1e-3,
                      max_iter: int = 30, min_iter: int = 2, seed: int = 0,
                      on_iter: Callable[[int], None] | None = None) -> tuple[dict[str, float], int, bool]:
    """Hutchinson estimates of tr(∂²L/∂W_k²) for every tensor in ``params``.

    ``loss_fn``: the loss, or a sequence of parts whose sum is the loss (e.g. one per batch). Hessian-vector
    products are linear in the loss, so each part's is taken on its own with the same probe vectors and summed:
    the double-backward graph of one part is alive at a time (SmolLM2's 8 windows: peak RSS 6.1 GB in one
    graph).

    Returns (trace per name, iterations run, converged: every running mean moved < ``tol`` relative)."""
    names = list(params)
    tensors = [params[n] for n in names]
    parts = list(loss_fn) if isinstance(loss_fn, (list, tuple)) else [loss_fn]
    gen = torch.Generator().manual_seed(seed)
    means = [0.0] * len(names)
    converged = False
    it = 0
    with _grad_only(tensors, module), _math_attention():
        for it in range(1, max_iter + 1):
            vs = [torch.randint(0, 2, t.shape, generator=gen).to(t.dtype) * 2 - 1 for t in tensors]
            hv_sum: list[torch.Tensor | None] = [None] * len(tensors)
            for part in parts:
                grads = torch.autograd.grad(part(module), tensors, create_graph=True, allow_unused=True)
                used = [k for k, g in enumerate(grads) if g is not None and g.requires_grad]
                if not used:
                    continue
                gv = sum((grads[k] * vs[k]).sum() for k in used)
                hv = torch.autograd.grad(gv, [tensors[k] for k in used], allow_unused=True)
                for k, h in zip(used, hv):
                    if h is not None:
                        hv_sum[k] = h if hv_sum[k] is None else hv_sum[k] + h
                del grads, gv, hv
            if all(h is None for h in hv_sum):
                break
            worst = 0.0
            for k, v in enumerate(vs):
                h = hv_sum[k]
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


def _sq_error(bench: Workbench, node_name: str, spec: Any, optimizer: str = "rtn") -> tuple[float, torch.Tensor]:
    from qgraph.passes.quantize_weights import dequantized

    w = bench.graph.param(bench.graph.find(node_name), "weight").detach()
    deq = dequantized(bench.qweight(node_name, spec, optimizer), w)
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
    traces, iters, converged = hutchinson_traces(graph.gm, params, make_loss_parts(bench), tol=tol,
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
    dens = {space.layers[i].key: traces.get(space.layers[i].key, 0.0) / max(space.layers[i].numel, 1) for i in idx}
    positive = sorted(v for v in dens.values() if v > 0)
    floor = positive[len(positive) // 2] if positive else 0.0
    if progress and any(v <= 0 for v in dens.values()):
        progress(f"{sum(v <= 0 for v in dens.values())} layer trace(s) ≤ 0 (below the estimator's noise): "
                 f"set to the median positive per-element trace, {floor:.3g}")
    omega = []
    per_elem = {}
    for i, layer in enumerate(space.layers):
        row = []
        t = (dens[layer.key] if dens[layer.key] > 0 else floor) if i in idx else 0.0
        per_elem[layer.key] = t
        for ch in layer.choices:
            if ch.is_float or i not in idx:
                row.append(0.0)
                continue
            w_term = t * _sq_error(bench, layer.node, ch.weight, ch.optimizer)[0] if ch.weight is not None else 0.0
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
                _, deq = _sq_error(bench, layer.node, ch.weight, ch.optimizer)
                with _swapped_weight(bench.graph, layer.node, deq), torch.no_grad():
                    row.append(2.0 * float(loss_fn(bench.graph.gm)))
        omega.append(tuple(row))
        if progress:
            progress(f"proxy sensitivity {i + 1}/{len(space.layers)}")
    return Sensitivity("proxy", tuple(omega), {}, 0, True, time.perf_counter() - t0)


def metric_loss(metric_name: str, base: float, value: float) -> float:
    """A measured metric as a loss in the units of the sensitivity loss: the cosine gap to float, or the
    log perplexity ratio (the cross-entropy increase, which a KL to the float model approximates)."""
    if metric_name == "perplexity":
        return math.log(max(value, 1e-30) / max(base, 1e-30))
    return base - value


def _family(label: str) -> str:
    return "act" if "+a" in label else ("bcq" if label.startswith("bcq") else "uniform")


def anchor_sensitivity(sens: Sensitivity, space: Space, anchors: dict[str, tuple[Sequence[int], float]],
                       coverage: float = 0.5) -> tuple[Sensitivity, dict[str, float]]:
    """Ω with each choice label's entries scaled so the uniform strategies' Ω match their measured loss.

    ``anchors``: label → (the uniform assignment evaluated, its measured loss, see `metric_loss`). A label
    is scaled by s_L = 2·max(loss, 0) / Σ_i Ω_i(a_i) when the layers offering it hold at least ``coverage``
    of the searched weights (else its anchor measured mostly other labels); other labels take the geometric
    mean of the positive scales of their family (BCQ, uniform weight-only, with activations), or of all.
    Returns the anchored Sensitivity and the scale per label."""
    idx = space.searchable
    total = sum(space.layers[i].numel for i in idx) or 1
    scales: dict[str, float] = {}
    for label, (a, loss) in anchors.items():
        offered = sum(space.layers[i].numel for i in idx if label in [ch.label for ch in space.layers[i].choices])
        om = sens.total(a)
        if offered >= coverage * total and om > 0:
            scales[label] = 2.0 * max(loss, 0.0) / om

    def geo(vals: list[float]) -> float | None:
        vals = [v for v in vals if v > 0]
        return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None

    fallback = geo(list(scales.values())) or 1.0
    every = {ch.label for i in idx for ch in space.layers[i].choices if not ch.is_float}
    for label in sorted(every - set(scales)):
        scales[label] = geo([v for k, v in scales.items() if _family(k) == _family(label)]) or fallback
    return scale_sensitivity(sens, space, scales), dict(sorted(scales.items()))


def scale_sensitivity(sens: Sensitivity, space: Space, scales: dict[str, float]) -> Sensitivity:
    """Ω with each entry multiplied by its choice label's scale (labels not in ``scales``: 1)."""
    omega = tuple(tuple(v * scales.get(ch.label, 1.0) if not ch.is_float else 0.0
                        for v, ch in zip(row, layer.choices))
                  for row, layer in zip(sens.omega, space.layers))
    return Sensitivity(sens.method + "+anchored", omega, sens.traces, sens.iterations, sens.converged, sens.seconds)


def probe_layers(space: Space, share: float = 0.25, seed: int = 0) -> list[int]:
    """A seeded random ``share`` of the searched layers (at least one): where local anchors apply a label."""
    import numpy as np

    idx = space.searchable
    k = max(1, round(share * len(idx)))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(idx, size=min(k, len(idx)), replace=False))


def local_probe(space: Space, reference: Sequence[int], label: str, layers: Sequence[int]) -> tuple[int, ...] | None:
    """``reference`` with ``label`` on those of ``layers`` that offer it (ties repaired); None if unchanged."""
    a = list(reference)
    for i in layers:
        names = [ch.label for ch in space.layers[i].choices]
        if label in names:
            a[i] = names.index(label)
    out = space.repair_ties(tuple(a))
    return None if out == tuple(reference) else out


def local_anchor_scales(sens: Sensitivity, space: Space, scales: dict[str, float], reference: Sequence[int],
                        ref_loss: float, probes: dict[str, tuple[Sequence[int], float]]) -> dict[str, float]:
    """Per-label scales fitted around ``reference`` (see the module docstring).

    ``scales``: the current ones (from `anchor_sensitivity`), used for every label but the probed one;
    ``probes``: label → (``local_probe`` assignment, its measured loss). For each probe, with C the layers it
    changed: s_L = (2·(loss − ref_loss) + Σ_C s·Ω(R) − Σ_{C, label ≠ L} s·Ω) / Σ_{C, label = L} Ω_i(L), at
    least 0. Labels without a usable probe keep their scale."""
    out = dict(scales)

    def term(i: int, c: int) -> float:
        ch = space.layers[i].choices[c]
        return 0.0 if ch.is_float else sens.omega[i][c] * scales.get(ch.label, 1.0)

    for label, (a, loss) in probes.items():
        changed = [i for i in range(len(space.layers)) if a[i] != reference[i]]
        own = sum(sens.omega[i][a[i]] for i in changed if space.layers[i].choices[a[i]].label == label)
        if own <= 0:
            continue
        rest = sum(term(i, a[i]) for i in changed if space.layers[i].choices[a[i]].label != label)
        before = sum(term(i, reference[i]) for i in changed)
        out[label] = max(0.0, (2.0 * (loss - ref_loss) + before - rest) / own)
    return dict(sorted(out.items()))


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
