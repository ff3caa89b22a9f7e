"""Search drivers: greedy by sensitivity, ILP on Ω (scipy.optimize.milp), and NSGA-II.

Every driver proposes only assignments that the target runs, that keep the tie constraints and that meet
the constraints known before evaluation (bytes, average bits, predicted latency); the metric-drop limit
is checked on the measured trials. Drivers are deterministic for a given seed and given trial results,
so a resumed search proposes the same strategies again and finds them in the cache.

- ``greedy`` (HAGO-style): from all-float, repeatedly apply the move with the least Ω increase per unit
  of constraint budget saved until the constraints hold, then spend any slack on the moves that lower Ω
  most. Solved at the user's limits and at tighter ones (for the front); with a metric-drop limit and no
  size limit, a bisection over budgets finds the smallest strategy within the drop.
- ``ilp``: minimise Σ Ω_i(c) with one-hot choices per layer under the linear size / bits / latency / tie
  constraints (scipy's HiGHS MILP); same budget schedule as greedy.
- ``nsga``: NSGA-II on (1 − metric or perplexity, bytes[, latency]) with constrained domination, seeded
  with the greedy and ILP solutions; offspring by uniform crossover and ±1-step mutation, repaired into
  the feasible set.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from qgraph.search.objectives import Analytic, Constraints, CostTable, Metric, Trial, analytic
from qgraph.search.pareto import crowding_distance, nondominated_sort
from qgraph.search.sensitivity import Sensitivity
from qgraph.search.space import Assignment, SearchError, Space
from qgraph.search.strategy import Strategy

DRIVERS = ("greedy", "ilp", "nsga")


@dataclass
class Problem:
    """A search problem: space, cost and sensitivity tables, constraints, and the trial evaluator.

    ``evaluate(strategies) -> list of result dicts`` (metric, drop, ...); ``max_trials`` bounds the number of
    distinct strategies evaluated (cache hits count, so a resumed search walks the same path).
    """

    space: Space
    costs: CostTable
    sens: Sensitivity
    constraints: Constraints
    metric: Metric
    evaluate_fn: Callable[[list[Strategy]], list[dict[str, Any]]]
    max_trials: int = 50
    use_latency: bool = False
    trials: list[Trial] = field(default_factory=list)
    _seen: dict[Assignment, Trial] = field(default_factory=dict)

    # --- analytic helpers -----------------------------------------------------------------------
    def analytic(self, a: Assignment, constraints: Constraints | None = None) -> Analytic:
        return analytic(self.space, self.costs, constraints or self.constraints, a)

    def omega(self, a: Assignment) -> float:
        return self.sens.total(a)

    @property
    def has_analytic_limits(self) -> bool:
        c = self.constraints
        return any(x is not None for x in (c.max_bytes, c.max_latency_us, c.avg_bits))

    def remaining(self) -> int:
        return self.max_trials - len(self.trials)

    # --- evaluation -------------------------------------------------------------------------------
    def evaluate(self, assignments: list[Assignment]) -> list[Trial]:
        """Evaluate (once each) up to ``remaining()`` new assignments; returns the trials of all given ones
        that have been evaluated, in order."""
        new = []
        for a in assignments:
            if a not in self._seen and a not in new and len(new) < self.remaining():
                new.append(a)
        if new:
            strategies = [self.space.strategy(a) for a in new]
            results = self.evaluate_fn(strategies)
            for a, s, r in zip(new, strategies, results):
                an = self.analytic(a)
                drop = float(r["drop"])
                t = Trial(a, s, an, float(r["metric"]), drop, an.feasible and self.constraints.metric_ok(drop),
                          measured_latency_us=r.get("measured_latency_us"),
                          extra={k: v for k, v in r.items() if k not in ("metric", "drop", "measured_latency_us")})
                self._seen[a] = t
                self.trials.append(t)
        return [self._seen[a] for a in assignments if a in self._seen]

    def best(self) -> Trial | None:
        """The feasible trial with the best metric (ties: fewer bytes); with only a metric-drop limit, the
        smallest feasible trial (ties: better metric)."""
        ok = [t for t in self.trials if t.feasible]
        if not ok:
            return None
        if not self.has_analytic_limits and self.constraints.max_metric_drop is not None:
            return min(ok, key=lambda t: (t.analytic.bytes, self.metric.error(t.metric)))
        return min(ok, key=lambda t: (self.metric.error(t.metric), t.analytic.bytes))


# --- constraint schedules ------------------------------------------------------------------------
def scaled(c: Constraints, s: float) -> Constraints:
    """Limits tightened by factor ``s`` (≤ 1) — on the part above the float-free minimum for bits."""
    return replace(c, max_bytes=None if c.max_bytes is None else c.max_bytes * s,
                   max_latency_us=None if c.max_latency_us is None else c.max_latency_us * s,
                   avg_bits=None if c.avg_bits is None else c.avg_bits * s)


def budget_schedule(problem: Problem, n: int) -> list[Constraints]:
    """Constraint sets to solve at: the user's, then ``n - 1`` tighter ones down to the smallest strategy.
    Without size limits: byte budgets from the smallest to the float size (used for bisection)."""
    space = problem.space
    lo_bytes = space.weight_bytes(space.low())
    if problem.has_analytic_limits:
        c = problem.constraints
        lows = []
        low = space.low()
        an = problem.analytic(low, Constraints())
        for cap, val in ((c.max_bytes, an.bytes), (c.max_latency_us, an.latency_us), (c.avg_bits, an.avg_bits)):
            if cap is not None:
                lows.append(min(1.0, val / cap))
        floor = max(lows) if lows else 0.0
        scales = [1.0] + [1.0 - (1.0 - floor) * k / max(n - 1, 1) for k in range(1, n)]
        return [scaled(c, s) for s in scales]
    hi_bytes = space.weight_bytes(space.high())
    return [replace(problem.constraints, max_bytes=lo_bytes + (hi_bytes - lo_bytes) * k / max(n - 1, 1))
            for k in range(n)]


# --- greedy ----------------------------------------------------------------------------------------
class _Tables:
    """Per-(layer, choice) bytes, bits·numel, latency and Ω, for O(1) move evaluation."""

    def __init__(self, problem: Problem):
        space = problem.space
        self.space = space
        self.cols = list(zip(space.bytes_table(), space.bits_numel_table(), problem.costs.per_layer,
                             problem.sens.omega))
        self.nbits = max(sum(space.layers[i].numel for i in space.counted_for_bits), 1)
        self.base_us = problem.costs.base_us
        self.group_of = {i: g for g in space.ties for i in g}

    def totals(self, a: Assignment) -> list[float]:
        t = [0.0, 0.0, 0.0, 0.0]
        for i, c in enumerate(a):
            for k in range(4):
                t[k] += self.cols[i][k][c]
        return t

    def delta(self, a: Assignment, changes: list[tuple[int, int]]) -> list[float]:
        d = [0.0, 0.0, 0.0, 0.0]
        for i, c in changes:
            for k in range(4):
                d[k] += self.cols[i][k][c] - self.cols[i][k][a[i]]
        return d

    def violation(self, c: Constraints, t: list[float]) -> float:
        return c.analytic_violation(t[0], self.base_us + t[2], t[1] / self.nbits)

    def moves(self, a: Assignment) -> list[list[tuple[int, int]]]:
        """Single-layer moves (tie groups repaired) and whole-group moves to one choice label."""
        space = self.space
        out: list[list[tuple[int, int]]] = []
        for i in space.searchable:
            group = self.group_of.get(i)
            for c in range(len(space.layers[i].choices)):
                if c == a[i]:
                    continue
                if group is None:
                    out.append([(i, c)])
                    continue
                b = list(a)
                b[i] = c
                r = space.repair_ties(tuple(b))
                changes = [(j, r[j]) for j in group if r[j] != a[j]]
                if changes:
                    out.append(changes)
        for group in space.ties:
            labels = [[ch.label for ch in space.layers[j].choices] for j in group]
            for label in labels[0]:
                if all(label in ls for ls in labels):
                    changes = [(j, ls.index(label)) for j, ls in zip(group, labels) if a[j] != ls.index(label)]
                    if changes:
                        out.append(changes)
        return out


def _apply(a: Assignment, changes: list[tuple[int, int]]) -> Assignment:
    b = list(a)
    for i, c in changes:
        b[i] = c
    return tuple(b)


def _lower(problem: Problem, tables: _Tables, c: Constraints, a: Assignment) -> Assignment | None:
    """Apply least-ΔΩ-per-violation-removed moves until ``c`` holds (None when stuck)."""
    t = tables.totals(a)
    v0 = tables.violation(c, t)
    while v0 > 0:
        best, best_key = None, None
        for changes in tables.moves(a):
            d = tables.delta(a, changes)
            t1 = [x + y for x, y in zip(t, d)]
            v1 = tables.violation(c, t1)
            if v1 >= v0:
                continue
            key = (d[3] / (v0 - v1), -(v0 - v1))
            if best_key is None or key < best_key:
                best, best_key = (changes, t1, v1), key
        if best is None:
            return None
        a, t, v0 = _apply(a, best[0]), best[1], best[2]
    return a


def refine(problem: Problem, c: Constraints, a: Assignment, tables: _Tables | None = None) -> Assignment:
    """Spend slack: apply the feasible move that lowers Ω most until none does."""
    tables = tables or _Tables(problem)
    t = tables.totals(a)
    while True:
        best, best_d = None, -1e-15 * max(abs(t[3]), 1.0)
        for changes in tables.moves(a):
            d = tables.delta(a, changes)
            if d[3] >= best_d:
                continue
            t1 = [x + y for x, y in zip(t, d)]
            if tables.violation(c, t1) > 0:
                continue
            best, best_d = (changes, t1), d[3]
        if best is None:
            return a
        a, t = _apply(a, best[0]), best[1]


def _infeasible(problem: Problem, c: Constraints) -> SearchError:
    an = problem.analytic(problem.space.low(), c)
    return SearchError(f"no strategy meets the constraints ({c.describe()}); the smallest one has "
                       f"{an.bytes / 1e6:.3f} MB, {an.avg_bits:.2f} avg bits, {an.latency_us:.1f} µs predicted")


def greedy_solve(problem: Problem, c: Constraints, start: Assignment | None = None) -> Assignment:
    """From ``start`` (all-float), lower by least ΔΩ per unit of constraint violation removed until ``c``
    holds, then refine (spend the slack where Ω drops most)."""
    tables = _Tables(problem)
    a = _lower(problem, tables, c, start if start is not None else problem.space.high())
    if a is None:
        raise _infeasible(problem, c)
    return refine(problem, c, a, tables)


def make_feasible(problem: Problem, a: Assignment, c: Constraints | None = None) -> Assignment:
    """Lower ``a`` by least ΔΩ per violation removed until the constraints hold (no refinement)."""
    c = c or problem.constraints
    out = _lower(problem, _Tables(problem), c, a)
    return out if out is not None else greedy_solve(problem, c)


# --- ILP -------------------------------------------------------------------------------------------
def ilp_solve(problem: Problem, c: Constraints) -> Assignment:
    """Minimise Σ Ω under ``c`` with scipy.optimize.milp (HiGHS)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    space = problem.space
    offsets, n = [], 0
    for layer in space.layers:
        offsets.append(n)
        n += len(layer.choices)
    cost = np.zeros(n)
    for i, layer in enumerate(space.layers):
        for k in range(len(layer.choices)):
            cost[offsets[i] + k] = problem.sens.omega[i][k]
    rows: list[tuple[dict[int, float], float, float]] = []
    for i, layer in enumerate(space.layers):
        rows.append(({offsets[i] + k: 1.0 for k in range(len(layer.choices))}, 1.0, 1.0))
    bytes_t, bits_t = space.bytes_table(), space.bits_numel_table()
    if c.max_bytes is not None:
        rows.append(({offsets[i] + k: float(b) for i, r in enumerate(bytes_t) for k, b in enumerate(r)},
                     -np.inf, float(c.max_bytes)))
    if c.avg_bits is not None:
        total = sum(space.layers[i].numel for i in space.counted_for_bits)
        rows.append(({offsets[i] + k: b for i, r in enumerate(bits_t) for k, b in enumerate(r) if b},
                     -np.inf, c.avg_bits * total))
    if c.max_latency_us is not None:
        rows.append(({offsets[i] + k: lat for i, r in enumerate(problem.costs.per_layer) for k, lat in enumerate(r)},
                     -np.inf, c.max_latency_us - problem.costs.base_us))
    for group in space.ties:
        keys = sorted({space._act_key(i, k) for i in group for k in range(len(space.layers[i].choices))})
        for i, j in itertools.pairwise(group):
            for key in keys[:-1]:  # the last key follows from the one-hot rows
                row = {offsets[i] + k: 1.0 for k in range(len(space.layers[i].choices)) if space._act_key(i, k) == key}
                for k in range(len(space.layers[j].choices)):
                    if space._act_key(j, k) == key:
                        row[offsets[j] + k] = row.get(offsets[j] + k, 0.0) - 1.0
                rows.append((row, 0.0, 0.0))
    a_mat = lil_matrix((len(rows), n))
    lo, hi = np.empty(len(rows)), np.empty(len(rows))
    for r, (coefs, low, high) in enumerate(rows):
        for col, v in coefs.items():
            a_mat[r, col] = v
        lo[r], hi[r] = low, high
    res = milp(cost, constraints=LinearConstraint(a_mat.tocsr(), lo, hi), integrality=np.ones(n),
               bounds=Bounds(0, 1), options={"time_limit": 60.0})
    if res.x is None:
        raise SearchError(f"no strategy meets the constraints ({c.describe()}) (ILP: {res.message})")
    x = res.x
    a = tuple(int(np.argmax(x[offsets[i]:offsets[i] + len(layer.choices)])) for i, layer in enumerate(space.layers))
    # HiGHS tolerances can leave a constraint violated by rounding: finish greedily if so.
    return make_feasible(problem, space.repair_ties(a), c)


# --- budget drivers (greedy, ilp) ------------------------------------------------------------------
def run_budget_driver(problem: Problem, solve: Callable[[Problem, Constraints], Assignment]) -> None:
    """Evaluate the solution at the user's limits first, then (bisection for a metric-drop-only search)
    solutions at tighter budgets until the trial budget is spent."""
    n = max(problem.max_trials, 1)
    schedule = budget_schedule(problem, max(n, 2) if not problem.has_analytic_limits else n)
    memo: dict[int, Assignment] = {}

    def at(k: int) -> Assignment:
        if k not in memo:
            memo[k] = solve(problem, schedule[k])
        return memo[k]

    if problem.has_analytic_limits:
        for k in range(len(schedule)):
            if problem.remaining() <= 0:
                break
            problem.evaluate([at(k)])
        return
    # metric drop only: smallest budget whose solution keeps the drop within the limit (bisection), then
    # fill the front with the rest of the schedule.
    lo, hi = 0, len(schedule) - 1
    while lo < hi and problem.remaining() > 0:
        mid = (lo + hi) // 2
        t = problem.evaluate([at(mid)])
        if t and problem.constraints.metric_ok(t[0].drop):
            hi = mid
        else:
            lo = mid + 1
    if problem.remaining() > 0:
        problem.evaluate([at(lo)])
    for k in _spread(len(schedule)):
        if problem.remaining() <= 0:
            break
        problem.evaluate([at(k)])


def _spread(n: int) -> list[int]:
    """0..n-1 in an order that covers the range evenly early (bisection order)."""
    out, seen = [], set()
    step = n
    while step >= 1:
        for k in range(0, n, step):
            if k not in seen:
                seen.add(k)
                out.append(k)
        step //= 2
    return out


def greedy(problem: Problem, seed: int = 0) -> None:
    run_budget_driver(problem, greedy_solve)


def ilp(problem: Problem, seed: int = 0) -> None:
    run_budget_driver(problem, ilp_solve)


# --- NSGA-II ---------------------------------------------------------------------------------------
def _objectives(problem: Problem, t: Trial) -> tuple[float, ...]:
    return t.objectives(problem.metric, problem.use_latency)


def _rank(problem: Problem, pop: list[Trial]) -> tuple[dict[int, int], dict[int, float]]:
    """Constrained non-dominated rank and crowding distance of each population index."""
    feas = [i for i, t in enumerate(pop) if t.feasible]
    infeas = sorted((i for i, t in enumerate(pop) if not t.feasible),
                    key=lambda i: (max(pop[i].drop - (problem.constraints.max_metric_drop or 0.0), 0.0)
                                   + pop[i].analytic.violation, i))
    rank: dict[int, int] = {}
    crowd: dict[int, float] = {}
    pts = [_objectives(problem, t) for t in pop]
    r = 0
    for front in nondominated_sort([pts[i] for i in feas]):
        members = [feas[i] for i in front]
        d = crowding_distance(pts, members)
        for m in members:
            rank[m], crowd[m] = r, d[m]
        r += 1
    for k, i in enumerate(infeas):
        rank[i], crowd[i] = r + k, 0.0
    return rank, crowd


def _tournament(rng: np.random.Generator, rank: dict[int, int], crowd: dict[int, float], n: int) -> int:
    a, b = (int(x) for x in rng.integers(0, n, size=2))
    ka, kb = (rank[a], -crowd[a], a), (rank[b], -crowd[b], b)
    return a if ka <= kb else b


def _mutate(problem: Problem, rng: np.random.Generator, a: Assignment, rate: float) -> Assignment:
    out = list(a)
    for i in problem.space.searchable:
        if rng.random() < rate:
            n = len(problem.space.layers[i].choices)
            if rng.random() < 0.7:
                out[i] = int(min(max(out[i] + (1 if rng.random() < 0.5 else -1), 0), n - 1))
            else:
                out[i] = int(rng.integers(0, n))
    return tuple(out)


def _crossover(problem: Problem, rng: np.random.Generator, a: Assignment, b: Assignment) -> Assignment:
    out = list(a)
    for i in problem.space.searchable:
        if rng.random() < 0.5:
            out[i] = b[i]
    return tuple(out)


def _repair(problem: Problem, rng: np.random.Generator, a: Assignment) -> Assignment:
    return make_feasible(problem, problem.space.repair_ties(a, rng=rng))


def nsga(problem: Problem, seed: int = 0, pop_size: int | None = None, refine_share: float = 0.5) -> None:
    """NSGA-II (constrained domination, crowding) on the measured metric and the analytic size/latency.

    ``refine_share`` of the offspring are refined towards the limits by Ω (a memetic step)."""
    rng = np.random.default_rng(seed)
    space = problem.space
    tables = _Tables(problem)
    n = pop_size or max(4, min(16, problem.max_trials // 4))
    seeds: list[Assignment] = []
    schedule = budget_schedule(problem, 3)[:2 if problem.has_analytic_limits else 3]
    for k, c in enumerate(schedule):
        for solve in (ilp_solve, greedy_solve):
            try:
                seeds.append(solve(problem, c))
            except SearchError:
                if k == 0 and problem.has_analytic_limits:
                    raise
    seeds = list(dict.fromkeys(seeds))
    init = list(seeds[:n])
    tries = 0
    while len(init) < n and tries < 50 * n:
        tries += 1
        base = init[int(rng.integers(0, len(init)))] if init and rng.random() < 0.5 else \
            tuple(int(rng.integers(0, len(layer.choices))) if i in space.searchable else 0
                  for i, layer in enumerate(space.layers))
        cand = _repair(problem, rng, _mutate(problem, rng, base, 0.3))
        if cand not in init:
            init.append(cand)
    pop = problem.evaluate(init)
    rate = 2.0 / max(len(space.searchable), 1)
    while problem.remaining() > 0:
        rank, crowd = _rank(problem, pop)
        children: list[Assignment] = []
        tries = 0
        while len(children) < n and tries < 50 * n:
            tries += 1
            p1 = pop[_tournament(rng, rank, crowd, len(pop))].assignment
            p2 = pop[_tournament(rng, rank, crowd, len(pop))].assignment
            child = _crossover(problem, rng, p1, p2) if rng.random() < 0.9 else p1
            child = _repair(problem, rng, _mutate(problem, rng, child, rate))
            if problem.has_analytic_limits and rng.random() < refine_share:
                # memetic step: half the children climb to the limits along Ω (the chosen strategy lives
                # there); the other half keep the front diverse
                child = refine(problem, problem.constraints, child, tables)
            if child not in problem._seen and child not in children:
                children.append(child)
        if not children:
            break
        kids = problem.evaluate(children)
        if not kids:
            break
        merged = pop + [k for k in kids if k not in pop]
        rank, crowd = _rank(problem, merged)
        order = sorted(range(len(merged)), key=lambda i: (rank[i], -crowd[i], i))
        pop = [merged[i] for i in order[:n]]


def run_driver(name: str, problem: Problem, seed: int = 0) -> None:
    if name not in DRIVERS:
        raise SearchError(f"unknown driver {name!r}; use one of {', '.join(DRIVERS)}")
    {"greedy": greedy, "ilp": ilp, "nsga": nsga}[name](problem, seed)
