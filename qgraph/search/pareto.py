"""Pareto dominance for minimisation objectives: fronts, non-dominated sorting and crowding distance."""
from __future__ import annotations

import math
from collections.abc import Sequence

Point = Sequence[float]


def dominates(a: Point, b: Point) -> bool:
    """True when ``a`` is no worse than ``b`` in every objective and better in at least one."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the non-dominated points (duplicates of a front point are all kept), in input order."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


def nondominated_sort(points: Sequence[Point]) -> list[list[int]]:
    """Fronts F1, F2, ... (Deb et al.'s fast non-dominated sort)."""
    n = len(points)
    dominated_by: list[list[int]] = [[] for _ in range(n)]
    count = [0] * n
    for i in range(n):
        for j in range(i + 1, n):
            if dominates(points[i], points[j]):
                dominated_by[i].append(j)
                count[j] += 1
            elif dominates(points[j], points[i]):
                dominated_by[j].append(i)
                count[i] += 1
    fronts: list[list[int]] = []
    current = [i for i in range(n) if count[i] == 0]
    while current:
        fronts.append(current)
        nxt = []
        for i in current:
            for j in dominated_by[i]:
                count[j] -= 1
                if count[j] == 0:
                    nxt.append(j)
        current = sorted(nxt)
    return fronts


def crowding_distance(points: Sequence[Point], front: Sequence[int]) -> dict[int, float]:
    """NSGA-II crowding distance of each member of ``front`` (boundary points: infinity)."""
    dist = {i: 0.0 for i in front}
    if len(front) <= 2:
        return {i: math.inf for i in front}
    for k in range(len(points[front[0]])):
        order = sorted(front, key=lambda i: (points[i][k], i))
        lo, hi = points[order[0]][k], points[order[-1]][k]
        dist[order[0]] = dist[order[-1]] = math.inf
        if hi - lo <= 0:
            continue
        for a, b, c in zip(order, order[1:], order[2:]):
            dist[b] += (points[c][k] - points[a][k]) / (hi - lo)
    return dist
