"""Drivers on a synthetic problem (no model): every proposal runs on the target, keeps the ties and the
size/bits/latency limits; ILP is optimal on Ω; same seed, same search."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.search.drivers import Problem, greedy_solve, ilp_solve, run_driver
from qgraph.search.objectives import Constraints
from qgraph.search.space import SearchError
from tests.search import synthetic_problem


def _proposals(problem: Problem) -> list:
    return [t.assignment for t in problem.trials]


def _limits(problem: Problem, bits_frac: float, bytes_frac: float, use_bytes: bool, use_latency: bool) -> Constraints:
    space = problem.space
    lo, hi = space.low(), space.high()
    lo_an, hi_an = problem.analytic(lo, Constraints()), problem.analytic(hi, Constraints())
    def mid(a, b, f):
        return a + (b - a) * f
    return Constraints(
        avg_bits=mid(lo_an.avg_bits, 8.0, bits_frac),
        max_bytes=mid(lo_an.bytes, hi_an.bytes, bytes_frac) if use_bytes else None,
        max_latency_us=mid(lo_an.latency_us, hi_an.latency_us, 0.5) if use_latency else None)


@settings(max_examples=30, deadline=None)
@given(target=st.sampled_from(["x86-avx2", "npu-int8", "arm-neon"]), driver=st.sampled_from(["greedy", "ilp", "nsga"]),
       n_layers=st.integers(2, 7), seed=st.integers(0, 10_000), bits_frac=st.floats(0.05, 1.0),
       bytes_frac=st.floats(0.05, 1.0), use_bytes=st.booleans(), use_latency=st.booleans())
def test_every_proposal_meets_target_ties_and_limits(target, driver, n_layers, seed, bits_frac, bytes_frac, use_bytes,
                                                      use_latency):
    problem, tgt = synthetic_problem(target, n_layers, seed, Constraints(), max_trials=10)
    problem.constraints = _limits(problem, bits_frac, bytes_frac, use_bytes, use_latency)
    problem.use_latency = use_latency
    try:
        run_driver(driver, problem, seed=seed)
    except SearchError as e:
        # only when even the smallest strategy is too big
        assert "no strategy meets the constraints" in str(e)
        assert problem.analytic(problem.space.low()).violation > 0
        return
    assert problem.trials, "a feasible problem must yield trials"
    assert len(problem.trials) <= problem.max_trials
    for a in _proposals(problem):
        assert problem.space.violations(a, tgt) == []
        assert problem.analytic(a).violation == 0.0, problem.analytic(a)
    assert len(set(_proposals(problem))) == len(problem.trials)  # no strategy evaluated twice


@settings(max_examples=25, deadline=None)
@given(n_layers=st.integers(2, 6), seed=st.integers(0, 10_000), frac=st.floats(0.1, 0.9))
def test_ilp_is_optimal_on_omega(n_layers, seed, frac):
    problem, _ = synthetic_problem("x86-avx2", n_layers, seed, Constraints())
    c = _limits(problem, frac, frac, True, False)
    try:
        a_ilp = ilp_solve(problem, c)
    except SearchError:
        return
    a_gr = greedy_solve(problem, c)
    assert problem.analytic(a_ilp, c).violation == 0.0
    assert problem.omega(a_ilp) <= problem.omega(a_gr) * (1 + 1e-9) + 1e-12


def test_greedy_meets_and_uses_budget():
    problem, _ = synthetic_problem("x86-avx2", 8, 3, Constraints())
    c = Constraints(avg_bits=3.0)
    a = greedy_solve(problem, c)
    assert problem.space.avg_bits(a) <= 3.0 + 1e-9
    assert problem.space.avg_bits(a) > 2.5  # refine spent the slack
    # lower Ω than the uniform 3-bit strategy at the same budget
    assert problem.omega(a) <= problem.omega(problem.space.uniform("bcq3-g128")) + 1e-12


def test_infeasible_limits_are_a_clear_error():
    problem, _ = synthetic_problem("x86-avx2", 4, 0, Constraints(avg_bits=0.5))
    with pytest.raises(SearchError, match="no strategy meets the constraints"):
        run_driver("greedy", problem)


@pytest.mark.parametrize("driver", ["greedy", "ilp", "nsga"])
def test_same_seed_same_search(driver):
    runs = []
    for _ in range(2):
        problem, _ = synthetic_problem("x86-avx2", 6, 11, Constraints(avg_bits=3.5), max_trials=15)
        run_driver(driver, problem, seed=5)
        runs.append([t.strategy.sha256 for t in problem.trials] + [problem.best().strategy.sha256])
    assert runs[0] == runs[1]


def test_metric_drop_only_bisects_to_smallest_within_drop():
    problem, _ = synthetic_problem("x86-avx2", 6, 2, Constraints(max_metric_drop=0.02), max_trials=12)
    run_driver("greedy", problem)
    best = problem.best()
    assert best is not None and best.drop <= 0.02
    ok = [t for t in problem.trials if t.drop <= 0.02]
    assert best.analytic.bytes == min(t.analytic.bytes for t in ok)
    assert len(ok) < len(problem.trials)  # the bisection also probed strategies beyond the limit


@settings(max_examples=12, deadline=None)
@given(driver=st.sampled_from(["greedy", "ilp", "nsga"]), target=st.sampled_from(["x86-avx2", "npu-int8"]),
       n_layers=st.integers(2, 6), seed=st.integers(0, 10_000), bits_frac=st.floats(0.1, 1.0),
       drop=st.one_of(st.none(), st.floats(1e-4, 0.2)))
def test_chosen_meets_every_hard_constraint_and_front_is_nondominated(driver, target, n_layers, seed, bits_frac, drop):
    from dataclasses import replace

    from qgraph.search.pareto import dominates, pareto_front

    problem, tgt = synthetic_problem(target, n_layers, seed, Constraints(), max_trials=10)
    problem.constraints = replace(_limits(problem, bits_frac, 1.0, False, False), max_metric_drop=drop)
    run_driver(driver, problem, seed=seed)
    best = problem.best()
    feasible = [t for t in problem.trials if t.analytic.violation == 0 and (drop is None or t.drop <= drop)]
    assert (best is None) == (not feasible)
    if best is not None:  # the metric-drop limit is only known after a trial; the chosen one must meet it too
        assert problem.space.violations(best.assignment, tgt) == [] and best.analytic.violation == 0.0
        assert drop is None or best.drop <= drop + 1e-12
    pts = [t.objectives(problem.metric) for t in problem.trials]
    front = pareto_front(pts)
    assert front and not any(dominates(pts[j], pts[i]) for i in front for j in range(len(pts)))
