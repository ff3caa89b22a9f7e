"""Shared helpers of the search tests: a small model file (loadable by spawned workers via
``path.py:make``) and a synthetic search problem that needs no model at all."""
from __future__ import annotations

from pathlib import Path

import numpy as np

TOY_SOURCE = '''
import torch
import torch.nn as nn


class Toy(nn.Module):
    """q and k read the same tensor (a tie group); o sees both."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(256, 256)
        self.q = nn.Linear(256, 256)
        self.k = nn.Linear(256, 256)
        self.o = nn.Linear(512, 128)
        self.head = nn.Linear(128, 64)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h2 = torch.relu(self.o(torch.cat([self.q(h), self.k(h)], -1)))
        return self.head(h2)


def make():
    torch.manual_seed(0)
    model = Toy().eval()
    with torch.no_grad():  # uneven layer scales so sensitivities differ
        model.o.weight.mul_(3.0)
        model.k.weight.mul_(0.3)
    return model, (torch.randn(64, 256),)
'''


def write_toy(folder: Path) -> str:
    """Write the toy model file into ``folder``; return its ``path.py:make`` spec."""
    path = Path(folder) / "toy_model.py"
    path.write_text(TOY_SOURCE)
    return f"{path}:make"


def synthetic_problem(target_name: str, n_layers: int, seed: int, constraints, max_trials: int = 20):
    """A Problem over ``n_layers`` fake Gemm layers (pairs share an input: tie groups) with a made-up Ω
    and a metric that is a deterministic function of the assignment."""
    from qgraph.search.drivers import Problem
    from qgraph.search.objectives import METRICS, CostTable
    from qgraph.search.sensitivity import Sensitivity
    from qgraph.search.space import (
        Layer,
        Space,
        SpaceOptions,
        _ties,
        activation_spec,
        candidate_weight_specs,
        layer_choices,
    )
    from qgraph.target import load_target

    target = load_target(target_name)
    rng = np.random.default_rng(seed)
    weights = candidate_weight_specs(target, SpaceOptions())
    act = activation_spec(target)
    layers = []
    for i in range(n_layers):
        shape = (int(rng.choice([128, 256, 384])), int(rng.choice([128, 256, 512])))
        choices = layer_choices(target, "Gemm", shape, weights, act)
        layers.append(Layer(f"l{i}", f"n{i}", "Gemm", shape, choices, input_name=f"x{i // 2}"))
    space = Space(target.name, tuple(layers), _ties(layers))
    scale = rng.uniform(0.1, 10.0, size=n_layers)
    omega = tuple(tuple(0.0 if ch.is_float else float(scale[i] * layer.numel * 2.0 ** (-2 * ch.bits)
                                                      * (1.3 if ch.act is not None else 1.0))
                        for ch in layer.choices) for i, layer in enumerate(layers))
    lat = tuple(tuple(float(layer.bytes_of(c)) / 1e3 + (0.0 if ch.act is None else -1.0)
                      for c, ch in enumerate(layer.choices)) for layer in layers)
    costs = CostTable(target.name, 10.0, lat)
    sens = Sensitivity("synthetic", omega, {})

    def evaluate(strategies):
        out = []
        for s in strategies:
            a = space.assignment(s)
            total = sum(omega[i][c] for i, c in enumerate(a))
            value = 1.0 / (1.0 + 1e-3 * total)
            out.append({"metric": value, "drop": 1.0 - value})
        return out

    return Problem(space, costs, sens, constraints, METRICS["cosine"], evaluate, max_trials=max_trials), target
