"""clip-search's algorithm (LAPQ-style joint search and Q-Rater) on a simulation of a torch.fx graph.

Units are what one search variable moves: a layer's uniform weight range (`WeightUnit`) or one activation
input's range (`ActUnit`), each a log scale on its start range. `Sim` is a copy of the graph whose fake
quants read their qparams from modules, so one evaluation is one forward pass per batch; `Search` runs the
optimizers (coordinate descent, Powell, Q-Rater) within an evaluation budget and keeps the best point seen.
The pass (`qgraph.passes.clip_search`) picks the units, splits the calibration data and writes the results.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from qgraph.ir.meta import ANNOTATION_KEY, QPARAMS_KEY, QWEIGHT_KEY
from qgraph.quant import uniform
from qgraph.quant.qtensor import UniformWeight

_LP_STEPS, _LP_REFINE, _LP_MIN_RATIO = 20, 10, 0.2
_ROUNDING = (0.3, 0.7)


class _OutOfBudget(Exception):
    pass



# --- units: what one variable moves ------------------------------------------------------------------
@dataclass(eq=False)
class Layer:
    name: str
    qualname: str
    units: list = field(default_factory=list)
    fixed: torch.Tensor | None = None
    fixed_bcq: bool = False
    fixed_acts: bool = False


@dataclass(eq=False)
class WeightUnit:
    layer: Layer
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
class ActUnit:
    layer: Layer
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
class ActFQ(nn.Module):
    def __init__(self, qmin: int, qmax: int):
        super().__init__()
        self.qmin, self.qmax = qmin, qmax
        self.scale, self.zero_point = 1.0, 0
        self.enabled = True

    def forward(self, x):
        if not self.enabled:
            return x
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.qmin, self.qmax)


class Sim:
    """The model with every unit's quantization settable; ``loss()`` runs the calibration batches."""

    def __init__(self, graph, layers, data, refs, loss: str):
        self.g = graph.copy()
        self.data, self.refs, self.kind = data, refs, loss
        self.evals = 0
        self.float_w: dict[int, torch.Tensor] = {}
        self.params: dict[int, torch.Tensor] = {}
        self.fqs: dict[int, ActFQ] = {}
        by_name = {self.g.name(n): n for n in self.g.nodes()}
        for lay in layers:
            node = by_name[lay.name]
            w = self.g.param(node, "weight")
            if lay.fixed is not None:
                w.data.copy_(lay.fixed.to(w.dtype).reshape(w.shape))
            for u in lay.units:
                if isinstance(u, WeightUnit):
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

    def _insert(self, node, idx: int, spec) -> ActFQ:
        g = self.g
        producer = g.inputs(node)[idx]
        mod = ActFQ(spec.qmin, spec.qmax)
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

    def use(self, data: list, refs: list) -> None:
        """Evaluate on these batches (and float outputs) from now on."""
        self.data, self.refs = data, refs

    def loss(self) -> float:
        self.evals += 1
        total = 0.0
        for batch, ref in zip(self.data, self.refs):
            out = output_tensors(self.g(*batch))
            total += sum(output_loss(a, b, self.kind) for a, b in zip(out, ref))
        return total / len(self.data)


def graph_node(graph, name: str):
    return next(n for n in graph.nodes() if graph.name(n) == name)


def output_tensors(out) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (tensor, tuple / list / dict nest, or a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out.detach().to(torch.float32)] if out.is_floating_point() else []
    if isinstance(out, dict) or hasattr(out, "values") and callable(out.values):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in output_tensors(o)]
    return []


def output_loss(q: torch.Tensor, ref: torch.Tensor, kind: str) -> float:
    if kind == "kl" and ref.dim() >= 1 and ref.shape[-1] > 1:
        p = ref.log_softmax(-1)
        return float((p.exp() * (p - q.log_softmax(-1))).sum(-1).mean())
    return float((q - ref).square().mean() / ref.square().mean().clamp_min(1e-30))


# --- the search -------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """The search's choice (unit -> (log scale, rounding threshold, start)) and losses on its batches."""

    choice: dict
    loss: float
    loss_minmax: float
    loss_lp: float
    loss_start: float
    start: str
    minmax_choice: dict = field(default_factory=dict)
    start_choice: dict = field(default_factory=dict)


@dataclass
class HoldoutResult:
    """Which of min/max, the start and the search result did best on the held-out batches, and their losses."""

    choice: dict
    kept: str
    losses: dict[str, float]


class Search:
    def __init__(self, sim: Sim, layers, options, bar):
        self.sim, self.layers, self.o, self.bar = sim, layers, options, bar
        self.units = [u for lay in layers for u in lay.units]
        self.budget = options.evals

    # the state of a unit: (log scale, rounding threshold, start)
    def _apply(self, u, state) -> None:
        c, t, start = state
        if isinstance(u, WeightUnit):
            self.sim.set_weight(u, u.value(c, t, start))
        else:
            self.sim.set_act(u, u.qparams_for(c, start))

    def _float(self, u) -> None:
        if isinstance(u, WeightUnit):
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

    def run(self) -> SearchResult:
        starts = {}
        kinds = {isinstance(u, WeightUnit) for u in self.units}
        for w_start in ("minmax", "lp") if True in kinds else ("minmax",):
            for a_start in ("minmax", "lp") if False in kinds else ("minmax",):
                state = {u: (0.0, 0.5, w_start if isinstance(u, WeightUnit) else a_start) for u in self.units}
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
        return SearchResult(best, best_loss, loss_mm, loss_lp, starts[key][0], start,
                            minmax_choice=starts[("minmax", "minmax")][1], start_choice=starts[key][1])

    def holdout(self, result: SearchResult, data: list, refs: list) -> HoldoutResult:
        """Measure min/max, the start and the result on held-out batches (the search never saw them) and keep
        the best: a search that fits its own batches but not these is undone (ties keep the simpler one)."""
        self.sim.use(data, refs)
        losses, choices = {}, {}
        for name, choice in (("minmax", result.minmax_choice), ("start", result.start_choice),
                             ("result", result.choice)):
            if any(choice == c for c in choices.values()):
                continue
            choices[name] = choice
            losses[name] = self._full_loss(choice)
        kept = min(losses, key=lambda k: losses[k])
        return HoldoutResult(choices[kept], kept, losses)

    def _track(self, state, loss) -> None:
        if loss < self._best_loss:
            self._best_state, self._best_loss = dict(state), loss

    # LAPQ joint search: coordinate descent along groups of units, then single units
    def _coordinate(self, state: dict, loss: float):
        self._best_state, self._best_loss = dict(state), loss
        groups = [g for g in ([u for u in self.units if isinstance(u, WeightUnit)],
                              [u for u in self.units if isinstance(u, ActUnit)]) if g]
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
        coords = [(u, 0) for u in lay.units] + [(u, 1) for u in lay.units if isinstance(u, WeightUnit)]
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
