"""clip-search: choose clipping ranges on the calibration loss (LAPQ-style joint search, or Q-Rater).

Units: every annotated node's uniform weight (when no earlier pass quantized it) and every calibrated
activation input. Each unit's range starts from a per-layer Lp initialisation (``p``, default 2.4): the
weight's per-channel / per-group ranges shrunk by the Lp clip search of `qgraph.quant.uniform`, the
activation range from ``calibrate`` shrunk by the same search over a sample of its calibration values.
The start is the best (on the calibration loss) of the four combinations of {Lp, min/max} ranges for the
weights and {Lp, calibrate's} ranges for the activations; all-min/max is what the pipeline does without
this pass.

The variable of a unit is one log scale c on its start range, in ``[min_scale, max_scale]`` (a weight
range never grows past the weight's min/max). The calibration loss is the MSE between the fake-quantized
model's outputs and the float model's on up to ``max_batches`` calibration batches (``loss=kl``: the KL
divergence of the softmax over the last dim, for classifiers). It runs on a copy of the graph whose
fake-quant nodes read their qparams from modules, so an evaluation is one forward pass per batch.

- joint (default, LAPQ): coordinate descent in log space along the all-weights and all-activations
  directions and then along each unit (steps ±``step``, halved after a sweep with no gain), or
  ``method=powell`` (scipy.optimize.minimize over the same vector); ``evals`` evaluations at most.
- ``qrater=true`` (Q-Rater): layer by layer in topological order, search that layer's weight clip scale,
  its weight rounding threshold t ∈ [0.3, 0.7] (codes ⌊w/s + 1 − t⌋ + z; t = 0.5 is round to nearest)
  and its activation clip scales on the model-output loss, with the earlier layers quantized and frozen
  and the later ones still float; then freeze it. ``evals`` is shared out over the layers.

The best point seen is kept: the result's calibration loss is never above the start's (both are in the
stats: ``loss_minmax``, ``loss_lp`` (all Lp), ``loss_start``, ``loss``). Results: weights as `UniformWeight` in
``meta["qgraph.qweight"]`` (quantize-weights skips them), activation qparams overwrite calibrate's
``meta["qgraph.qparams"]``; per-unit choices go to ``ctx.report["clip_search"]``. BCQ weights are not
clipped (they are simulated as quantize-weights will make them, and left to it). torch.fx graphs only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from qgraph.errors import CalibrationError, PipelineError, SpecError
from qgraph.ir.inputs import batches
from qgraph.ir.meta import ANNOTATION_KEY, QPARAMS_KEY, QWEIGHT_KEY
from qgraph.pass_base import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    Pass,
    PassResult,
    at_least,
    in_range,
    optional,
    validate,
)
from qgraph.passes.quantize_weights import dequantized, quantize_tensor
from qgraph.progress import progress
from qgraph.quant import uniform
from qgraph.quant.qtensor import UniformWeight
from qgraph.registry import register_pass

_LP_STEPS, _LP_REFINE, _LP_MIN_RATIO = 20, 10, 0.2
_ROUNDING = (0.3, 0.7)


class _OutOfBudget(Exception):
    pass


@register_pass("clip-search", after=("annotate", "calibrate"), before=("quantize-weights", "insert-fq"),
               requires=("annotated",))
class ClipSearch(Pass):
    """Search per-layer clipping of weights and activations on the calibration loss (module docstring)."""

    frontends = {"fx"}
    frontend_reason = "its simulation harness edits and runs the torch.fx graph many times"

    @dataclass(frozen=True)
    class Options:
        evals: int = 200
        p: float = 2.4
        loss: Literal["mse", "kl"] = "mse"
        method: Literal["coordinate", "powell"] = "coordinate"
        qrater: bool = False
        weights: bool = True
        activations: bool = True
        step: float = 0.2
        min_scale: float = 0.5
        max_scale: float = 2.0
        max_batches: int | None = 4
        samples: int = 1 << 16

        def __post_init__(self):
            validate(self, evals=NON_NEGATIVE, p=POSITIVE, step=POSITIVE, min_scale=in_range(0, 1, lo_open=True),
                     max_scale=at_least(1), max_batches=optional(POSITIVE_INT), samples=POSITIVE_INT)

    def run(self, graph, ctx) -> PassResult:
        o = self.options
        layers, notes = self._select(graph)
        n_units = sum(len(u.units) for u in layers)
        if n_units == 0:
            if any(lay.fixed_bcq for lay in layers):
                raise SpecError("clip-search clips uniform weights and activations; this graph has only BCQ "
                                "weights (no range to clip) and no quantized activations: annotate a uniform "
                                "scheme or act_bits, or drop clip-search")
            return PassResult(graph, modified=False, preserved=frozenset({"*"}), stats={"units": 0})
        if ctx.calibration is None:
            raise CalibrationError("clip-search minimises the loss on calibration data: pass calib=[batch, ...] "
                                   "to qgraph.quantize (or set PassContext.calibration)")
        data = list(batches(ctx.calibration, graph, o.max_batches))
        if not data:
            raise CalibrationError("calibration data is empty: give at least one batch")
        with torch.no_grad():
            refs = [_tensors(graph(*b)) for b in data]
            if not refs[0]:
                raise CalibrationError("clip-search: the model returns no floating-point tensor to compare")
            self._init_activations(graph, layers, data, ctx.seed)
            for lay in layers:
                for u in lay.units:
                    u.init(o.p)
            sim = _Sim(graph, layers, data, refs, o.loss)
            total = o.evals + 5
            bar = iter(progress(range(total), desc="clip-search" + (" (q-rater)" if o.qrater else ""),
                                enabled=ctx.progress, unit="eval"))
            search = _Search(sim, layers, o, bar)
            result = search.run()
        for lay in layers:
            for u in lay.units:
                u.write(graph, result.choice[u])
        report = ctx.report.setdefault("clip_search", {})
        report["units"] = [u.row(result.choice[u]) for lay in layers for u in lay.units]
        if notes:
            report["notes"] = notes
        stats = {"weights": sum(isinstance(u, _WeightUnit) for lay in layers for u in lay.units),
                 "activations": sum(isinstance(u, _ActUnit) for lay in layers for u in lay.units),
                 "mode": "qrater" if o.qrater else o.method, "evals": sim.evals, "start": result.start,
                 "loss_minmax": result.loss_minmax, "loss_lp": result.loss_lp, "loss_start": result.loss_start,
                 "loss": result.loss}
        report.update(stats)
        return PassResult(graph, modified=True, preserved=frozenset({"*"}), stats=stats)

    # --- which units ---------------------------------------------------------------------------------
    def _select(self, graph):
        o = self.options
        layers, notes = [], []
        for node in graph.nodes():
            meta = graph.meta(node)
            ann = meta.get(ANNOTATION_KEY)
            if ann is None or not ann.is_quantized:
                continue
            lay = _Layer(graph.name(node), graph.qualname(node))
            w = graph.param(node, "weight")
            have = meta.get(QWEIGHT_KEY)
            if ann.weight is not None and w is not None:
                if have is not None:
                    lay.fixed = dequantized(have, w)
                    notes.append(f"{lay.qualname}: weight already quantized ({type(have).__name__}); kept")
                elif ann.weight.scheme != "uniform":
                    lay.fixed = dequantized(quantize_tensor(w.detach(), ann.weight), w)
                    lay.fixed_bcq = True
                    notes.append(f"{lay.qualname}: {ann.weight} is BCQ, not clipped (left to quantize-weights)")
                elif o.weights:
                    lay.units.append(_WeightUnit(lay, node, w.detach().to(torch.float32), ann.weight))
                else:
                    lay.fixed = dequantized(quantize_tensor(w.detach(), ann.weight), w)
            if o.activations:
                qparams = meta.get(QPARAMS_KEY, {})
                for idx, spec in sorted(ann.inputs.items()):
                    if f"input{idx}" not in qparams:
                        raise PipelineError(f"clip-search: activation input {idx} of {graph.name(node)} has no "
                                            f"qparams; run 'calibrate' before 'clip-search'")
                    if spec.granularity != "tensor":
                        raise SpecError(f"clip-search clips per-tensor activations only; {graph.name(node)} input "
                                        f"{idx} is {spec}")
                    lay.units.append(_ActUnit(lay, node, idx, spec, qparams[f"input{idx}"]))
            elif ann.inputs:
                lay.fixed_acts = True
            layers.append(lay)
        return layers, notes

    def _init_activations(self, graph, layers, data, seed: int) -> None:
        """Keep a random sample of each activation unit's calibration values (for its Lp init)."""
        acts = [u for lay in layers for u in lay.units if isinstance(u, _ActUnit)]
        if not acts:
            return
        gen = torch.Generator().manual_seed(seed)
        per_batch = max(1, self.options.samples // len(data))

        def on_value(i, t):
            flat = t.detach().reshape(-1).to(torch.float32)
            if flat.numel() > per_batch:
                flat = flat[torch.randint(flat.numel(), (per_batch,), generator=gen)]
            acts[i].samples.append(flat)

        graph.collect([(u.node, u.idx) for u in acts], data, on_value)


# --- units: what one variable moves ------------------------------------------------------------------
@dataclass(eq=False)
class _Layer:
    name: str
    qualname: str
    units: list = field(default_factory=list)
    fixed: torch.Tensor | None = None
    fixed_bcq: bool = False
    fixed_acts: bool = False


@dataclass(eq=False)
class _WeightUnit:
    layer: _Layer
    node: object
    w: torch.Tensor
    spec: object
    lo_mm: torch.Tensor | None = None
    hi_mm: torch.Tensor | None = None
    lo_lp: torch.Tensor | None = None
    hi_lp: torch.Tensor | None = None
    start: str = "lp"

    def init(self, p: float) -> None:
        self.lo_mm, self.hi_mm = uniform.min_max(self.w, self.spec)
        self.lo_lp, self.hi_lp = uniform._clip_search(self.w, self.lo_mm, self.hi_mm, self.spec, p=p,
                                                      steps=_LP_STEPS, refine=_LP_REFINE, min_ratio=_LP_MIN_RATIO)

    def upper(self, max_scale: float) -> float:
        """The largest log scale that still widens some range (weights never go past their min/max)."""
        if self.start == "minmax":
            return 0.0
        ratio = torch.cat([torch.where(self.hi_lp > 0, self.hi_mm / self.hi_lp, 1.0).reshape(-1),
                           torch.where(self.lo_lp < 0, self.lo_mm / self.lo_lp, 1.0).reshape(-1)])
        return math.log(max(1.0, float(ratio.max())))

    def qweight(self, c: float, t: float = 0.5, start: str | None = None) -> UniformWeight:
        start = start or self.start
        lo, hi = (self.lo_lp, self.hi_lp) if start == "lp" else (self.lo_mm, self.hi_mm)
        e = math.exp(c)
        lo = torch.maximum(lo * e, self.lo_mm)
        hi = torch.minimum(hi * e, self.hi_mm)
        scale, zp = uniform.compute_qparams(lo, hi, self.spec)
        x = self.w
        if t != 0.5:
            # ⌊w/s + 1 − t⌋ = round(w/s + 0.5 − t) up to ties: shift w by (0.5 − t)·s before rounding
            step = uniform.dequantize(torch.ones_like(x, dtype=torch.int8), scale, torch.zeros_like(zp), self.spec)
            x = x + (0.5 - t) * step
        return UniformWeight(uniform.quantize(x, scale, zp, self.spec), scale, zp, self.spec)

    def value(self, c: float, t: float = 0.5, start: str | None = None) -> torch.Tensor:
        return self.qweight(c, t, start).dequantize().reshape(self.w.shape)

    def write(self, graph, choice) -> None:
        c, t, start = choice
        graph.meta(self.node)[QWEIGHT_KEY] = self.qweight(c, t, start)

    def row(self, choice) -> dict:
        c, t, start = choice
        w_hat = self.value(c, t, start)
        return {"node": self.layer.qualname, "unit": "weight", "start": start, "scale": math.exp(c),
                "rounding": t, "rel_weight_err": float((w_hat - self.w).norm() / self.w.norm().clamp_min(1e-30))}


@dataclass(eq=False)
class _ActUnit:
    layer: _Layer
    node: object
    idx: int
    spec: object
    qparams: tuple
    samples: list = field(default_factory=list)
    lo_cal: torch.Tensor | None = None
    hi_cal: torch.Tensor | None = None
    lo_lp: torch.Tensor | None = None
    hi_lp: torch.Tensor | None = None
    start: str = "lp"

    def init(self, p: float) -> None:
        s, z = self.qparams
        s = torch.as_tensor(s, dtype=torch.float32)
        z = torch.as_tensor(z, dtype=torch.float32)
        self.lo_cal, self.hi_cal = s * (self.spec.qmin - z), s * (self.spec.qmax - z)
        x = torch.cat(self.samples) if self.samples else torch.zeros(1)
        self.samples = []
        self.lo_lp, self.hi_lp = uniform._clip_search(x, self.lo_cal, self.hi_cal, self.spec, p=p, steps=_LP_STEPS,
                                                      refine=_LP_REFINE, min_ratio=_LP_MIN_RATIO)

    def upper(self, max_scale: float) -> float:
        return math.log(max_scale)

    def qparams_for(self, c: float, start: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        start = start or self.start
        if start == "minmax" and c == 0.0:
            s, z = self.qparams
            return torch.as_tensor(s, dtype=torch.float32), torch.as_tensor(z, dtype=torch.int32)
        lo, hi = (self.lo_lp, self.hi_lp) if start == "lp" else (self.lo_cal, self.hi_cal)
        e = math.exp(c)
        return uniform.compute_qparams(lo * e, hi * e, self.spec)

    def write(self, graph, choice) -> None:
        c, _, start = choice
        graph.meta(self.node).setdefault(QPARAMS_KEY, {})[f"input{self.idx}"] = self.qparams_for(c, start)

    def row(self, choice) -> dict:
        c, _, start = choice
        s, z = self.qparams_for(c, start)
        s0, _ = self.qparams
        return {"node": self.layer.qualname, "unit": f"input{self.idx}", "start": start, "scale": math.exp(c),
                "qparams": [float(s), int(z)], "range_vs_calibrate": float(s) / max(float(s0), 1e-30)}


# --- the simulation: a graph copy whose fake quants read qparams from modules ----------------------------
class _ActFQ(nn.Module):
    def __init__(self, qmin: int, qmax: int):
        super().__init__()
        self.qmin, self.qmax = qmin, qmax
        self.scale, self.zero_point = 1.0, 0
        self.enabled = True

    def forward(self, x):
        if not self.enabled:
            return x
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.qmin, self.qmax)


class _Sim:
    """The model with every unit's quantization settable; ``loss()`` runs the calibration batches."""

    def __init__(self, graph, layers, data, refs, loss: str):
        self.g = graph.copy()
        self.data, self.refs, self.kind = data, refs, loss
        self.evals = 0
        self.float_w: dict[int, torch.Tensor] = {}
        self.params: dict[int, torch.Tensor] = {}
        self.fqs: dict[int, _ActFQ] = {}
        by_name = {self.g.name(n): n for n in self.g.nodes()}
        for lay in layers:
            node = by_name[lay.name]
            w = self.g.param(node, "weight")
            if lay.fixed is not None:
                w.data.copy_(lay.fixed.to(w.dtype).reshape(w.shape))
            for u in lay.units:
                if isinstance(u, _WeightUnit):
                    self.params[id(u)] = w
                    self.float_w[id(u)] = w.detach().clone()
                else:
                    self.fqs[id(u)] = self._insert(node, u.idx, u.spec)
            ann = self.g.meta(node).get(ANNOTATION_KEY)
            if lay.fixed_acts:
                graph_q = graph.meta(graph_node(graph, lay.name)).get(QPARAMS_KEY, {})
                for idx, spec in sorted(ann.inputs.items()):
                    fq = self._insert(node, idx, spec)
                    s, z = graph_q[f"input{idx}"]
                    fq.scale, fq.zero_point = float(s), int(z)
        self.g.gm.recompile()

    def _insert(self, node, idx: int, spec) -> _ActFQ:
        g = self.g
        producer = g.inputs(node)[idx]
        mod = _ActFQ(spec.qmin, spec.qmax)
        name = g._fresh_attr(f"_qgraph_clip_{g.name(node)}_{idx}")
        g.gm.add_submodule(name, mod)
        with g.gm.graph.inserting_before(node):
            new = g.gm.graph.call_module(name, (producer,))
        node.replace_input_with(producer, new)
        return mod

    def set_weight(self, u, value: torch.Tensor | None) -> None:
        p = self.params[id(u)]
        p.data.copy_((self.float_w[id(u)] if value is None else value).to(p.dtype).reshape(p.shape))

    def set_act(self, u, qparams) -> None:
        fq = self.fqs[id(u)]
        fq.enabled = qparams is not None
        if qparams is not None:
            fq.scale, fq.zero_point = float(qparams[0]), int(qparams[1])

    def loss(self) -> float:
        self.evals += 1
        total = 0.0
        for batch, ref in zip(self.data, self.refs):
            out = _tensors(self.g(*batch))
            total += sum(_loss(a, b, self.kind) for a, b in zip(out, ref))
        return total / len(self.data)


def graph_node(graph, name: str):
    return next(n for n in graph.nodes() if graph.name(n) == name)


def _tensors(out) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (tensor, tuple / list / dict nest, or a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out.detach().to(torch.float32)] if out.is_floating_point() else []
    if isinstance(out, dict) or hasattr(out, "values") and callable(out.values):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _loss(q: torch.Tensor, ref: torch.Tensor, kind: str) -> float:
    if kind == "kl" and ref.dim() >= 1 and ref.shape[-1] > 1:
        p = ref.log_softmax(-1)
        return float((p.exp() * (p - q.log_softmax(-1))).sum(-1).mean())
    return float((q - ref).square().mean() / ref.square().mean().clamp_min(1e-30))


# --- the search -------------------------------------------------------------------------------------
@dataclass
class _Result:
    choice: dict
    loss: float
    loss_minmax: float
    loss_lp: float
    loss_start: float
    start: str


class _Search:
    def __init__(self, sim: _Sim, layers, options, bar):
        self.sim, self.layers, self.o, self.bar = sim, layers, options, bar
        self.units = [u for lay in layers for u in lay.units]
        self.budget = options.evals

    # the state of a unit: (log scale, rounding threshold, start)
    def _apply(self, u, state) -> None:
        c, t, start = state
        if isinstance(u, _WeightUnit):
            self.sim.set_weight(u, u.value(c, t, start))
        else:
            self.sim.set_act(u, u.qparams_for(c, start))

    def _float(self, u) -> None:
        if isinstance(u, _WeightUnit):
            self.sim.set_weight(u, None)
        else:
            self.sim.set_act(u, None)

    def _eval(self, free: bool = False) -> float:
        if not free:
            if self.budget <= 0:
                raise _OutOfBudget
            self.budget -= 1
        next(self.bar, None)
        return self.sim.loss()

    def _full_loss(self, state: dict) -> float:
        for u in self.units:
            self._apply(u, state[u])
        return self._eval(free=True)

    def run(self) -> _Result:
        starts = {}
        kinds = {isinstance(u, _WeightUnit) for u in self.units}
        for w_start in ("minmax", "lp") if True in kinds else ("minmax",):
            for a_start in ("minmax", "lp") if False in kinds else ("minmax",):
                state = {u: (0.0, 0.5, w_start if isinstance(u, _WeightUnit) else a_start) for u in self.units}
                starts[(w_start, a_start)] = (self._full_loss(state), state)
        loss_mm = starts[("minmax", "minmax")][0]
        loss_lp = starts[(w_start, a_start)][0]
        key = min(starts, key=lambda k: starts[k][0])
        best_loss, best = starts[key]
        start = f"weights:{key[0]},activations:{key[1]}"
        for u in self.units:
            u.start = best[u][2]
        try:
            if self.o.qrater:
                state, loss = self._qrater(dict(best))
            elif self.o.method == "powell":
                state, loss = self._powell(dict(best), best_loss)
            else:
                state, loss = self._coordinate(dict(best), best_loss)
        except _OutOfBudget:
            state, loss = self._best_state, self._best_loss
        if self.o.qrater:
            loss = self._full_loss(state)  # later layers were float during the search: measure the whole
        if loss < best_loss:
            best, best_loss = state, loss
        return _Result(best, best_loss, loss_mm, loss_lp, starts[key][0], start)

    def _track(self, state, loss) -> None:
        if loss < self._best_loss:
            self._best_state, self._best_loss = dict(state), loss

    # LAPQ joint search: coordinate descent along groups of units, then single units
    def _coordinate(self, state: dict, loss: float):
        self._best_state, self._best_loss = dict(state), loss
        groups = [g for g in ([u for u in self.units if isinstance(u, _WeightUnit)],
                              [u for u in self.units if isinstance(u, _ActUnit)]) if g]
        directions = [g for g in groups if len(g) > 1] + [[u] for u in self.units]
        lo = math.log(self.o.min_scale)
        hi = {u: u.upper(self.o.max_scale) for u in self.units}
        step = self.o.step
        while step >= self.o.step / 16:
            improved = False
            for d in directions:
                for sign in (-1.0, 1.0):
                    trial = dict(state)
                    changed = False
                    for u in d:
                        c, t, s = state[u]
                        c2 = min(hi[u], max(lo, c + sign * step))
                        changed |= c2 != c
                        trial[u] = (c2, t, s)
                    if not changed:
                        continue
                    for u in d:
                        self._apply(u, trial[u])
                    f = self._eval()
                    if f < loss:
                        state, loss = trial, f
                        self._track(state, loss)
                        improved = True
                        break
                    for u in d:
                        self._apply(u, state[u])
            if not improved:
                step /= 2
        return state, loss

    def _powell(self, state: dict, loss: float):
        from scipy.optimize import minimize

        self._best_state, self._best_loss = dict(state), loss
        units = self.units
        lo = math.log(self.o.min_scale)
        hi = [u.upper(self.o.max_scale) for u in units]

        def objective(x):
            trial = {u: (float(min(hi[i], max(lo, x[i]))), state[u][1], state[u][2]) for i, u in enumerate(units)}
            for u in units:
                self._apply(u, trial[u])
            f = self._eval()
            self._track(trial, f)
            return f

        x0 = [state[u][0] for u in units]
        try:
            minimize(objective, x0, method="Powell", bounds=[(lo, h) for h in hi],
                     options={"maxfev": max(1, self.budget), "xtol": self.o.step / 16, "ftol": 1e-4,
                              "disp": False})
        except _OutOfBudget:
            pass
        return self._best_state, self._best_loss

    # Q-Rater: layer by layer, earlier layers frozen, later ones float
    def _qrater(self, state: dict):
        layers = [lay for lay in self.layers if lay.units]
        for u in self.units:
            self._float(u)
        lo = math.log(self.o.min_scale)
        self._best_state, self._best_loss = dict(state), float("inf")
        for n, lay in enumerate(layers):
            budget = self.budget // (len(layers) - n)
            for u in lay.units:
                self._apply(u, state[u])
            try:
                loss = self._eval()
            except _OutOfBudget:
                loss = None
            if loss is not None and budget > 1:
                state, _ = self._layer_search(lay, state, loss, budget - 1, lo)
        self._best_state = state
        return state, float("inf")

    def _layer_search(self, lay, state, loss, budget, lo):
        """Coordinate search over this layer's clip scales and its weight rounding threshold."""
        end = self.budget - budget
        coords = [(u, 0) for u in lay.units] + [(u, 1) for u in lay.units if isinstance(u, _WeightUnit)]
        steps = {0: self.o.step, 1: 0.1}
        bounds = {0: None, 1: _ROUNDING}
        while self.budget > end and max(steps.values()) >= 0.0125:
            improved = {0: False, 1: False}
            for u, k in coords:
                if steps[k] < 0.0125:
                    continue
                for sign in (-1.0, 1.0):
                    if self.budget <= end:
                        break
                    cur = list(state[u])
                    a, b = bounds[k] or (lo, u.upper(self.o.max_scale))
                    new = min(b, max(a, cur[k] + sign * steps[k]))
                    if new == cur[k]:
                        continue
                    cur[k] = new
                    self._apply(u, tuple(cur))
                    f = self._eval()
                    if f < loss:
                        state, loss = {**state, u: tuple(cur)}, f
                        improved[k] = True
                        break
                    self._apply(u, state[u])
            for k in steps:
                if not improved[k]:
                    steps[k] /= 2
        return state, loss
