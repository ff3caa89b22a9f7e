"""`CostTable`: predicted latency per (layer, choice) from the target's roofline cost model, so the latency of
any assignment is a sum (and the ILP stays linear)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qgraph.ir.graph_view import ANNOTATION_KEY
from qgraph.search.space import Space


@dataclass(frozen=True)
class CostTable:
    """Predicted µs: ``base`` for the nodes no choice changes, ``per_layer[i][c]`` for layer i at choice c."""

    target: str
    base_us: float
    per_layer: tuple[tuple[float, ...], ...]

    def predict(self, a: Sequence[int]) -> float:
        return self.base_us + sum(self.per_layer[i][c] for i, c in enumerate(a))


def cost_table(graph: Any, space: Space, target: Any) -> CostTable:
    """Per-(layer, choice) latency from `estimate_cost`: one cost estimate per distinct choice label,
    with every layer offering that label annotated with it (a node's cost depends only on its own
    annotation and shapes)."""
    from qgraph.analyses.cost import estimate_cost
    from qgraph.search.workbench import fresh_copy

    g = fresh_copy(graph)
    nodes = {g.name(n): n for n in g.nodes()}
    layer_nodes = [nodes[layer.node] for layer in space.layers]
    for n in g.nodes():
        g.meta(n).pop(ANNOTATION_KEY, None)
    base = estimate_cost(g, target).by_name()
    layer_names = {layer.node for layer in space.layers}
    base_us = sum(c.latency_us for name, c in base.items() if name not in layer_names)
    table = [[0.0] * len(layer.choices) for layer in space.layers]
    for label in space.labels():
        touched = []
        for i, (layer, n) in enumerate(zip(space.layers, layer_nodes)):
            idx = [c for c, ch in enumerate(layer.choices) if ch.label == label]
            g.meta(n).pop(ANNOTATION_KEY, None)
            if idx:
                ch = layer.choices[idx[0]]
                if not ch.is_float:
                    g.meta(n)[ANNOTATION_KEY] = ch.annotation
                touched.append((i, idx[0]))
        costs = estimate_cost(g, target).by_name()
        for i, c in touched:
            table[i][c] = costs[space.layers[i].node].latency_us
    return CostTable(target.name, base_us, tuple(tuple(r) for r in table))
