"""Pareto helpers: the front holds no dominated point and dominates every other point; sorting and
crowding distance behave as NSGA-II needs."""
from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.search.pareto import crowding_distance, dominates, nondominated_sort, pareto_front

points = st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20), st.integers(0, 5)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(points)
def test_front_has_no_dominated_point_and_covers_the_rest(pts):
    front = pareto_front(pts)
    assert front, "a non-empty set has a non-empty front"
    for i in front:
        assert not any(dominates(pts[j], pts[i]) for j in range(len(pts)))
    for i in set(range(len(pts))) - set(front):
        assert any(dominates(pts[j], pts[i]) for j in front)


@settings(max_examples=60, deadline=None)
@given(points)
def test_nondominated_sort_partitions_into_ordered_fronts(pts):
    fronts = nondominated_sort(pts)
    flat = [i for f in fronts for i in f]
    assert sorted(flat) == list(range(len(pts)))
    assert sorted(fronts[0]) == pareto_front(pts)
    for k, f in enumerate(fronts):
        for i in f:
            # nothing in the same or a later front dominates i; something in the previous front does
            assert not any(dominates(pts[j], pts[i]) for g in fronts[k:] for j in g)
            if k:
                assert any(dominates(pts[j], pts[i]) for j in fronts[k - 1])


def test_dominance_is_strict():
    assert dominates((1, 2), (1, 3)) and not dominates((1, 3), (1, 3)) and not dominates((0, 4), (1, 3))


def test_crowding_distance_boundaries_infinite_interior_finite():
    pts = [(0.0, 4.0), (1.0, 3.0), (2.0, 1.0), (4.0, 0.0)]
    d = crowding_distance(pts, [0, 1, 2, 3])
    assert math.isinf(d[0]) and math.isinf(d[3])
    assert math.isclose(d[1], (2 - 0) / 4 + (4 - 1) / 4)
    assert math.isclose(d[2], (4 - 1) / 4 + (3 - 0) / 4)
