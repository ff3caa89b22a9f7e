"""Node-by-node execution of an `FxGraph` for reconstruction passes (AdaRound, BRECQ).

`NodeRunner.run` executes one node from an environment of values, optionally with its weight replaced by
another tensor (a learned / quantized weight, possibly carrying gradients) and with some of its inputs
fake-quantized exactly as ``insert-fq`` would (``torch.fake_quantize_per_tensor_affine``, whose gradient is
straight-through inside the range). `Lockstep` runs the calibration batches through two environments node by
node, in an order the caller chooses: the float model and the quantized model (weights already quantized so
far, activations fake-quantized), so a pass can read a layer's (or a block's) float and quantized inputs when
it gets there. Values are dropped after their last use.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx
from torch.func import functional_call

from qgraph.ir.fx import FxGraph, _get_attr

FakeQuant = tuple[float, int, int, int]  # scale, zero point, qmin, qmax


class NodeRunner:
    """Runs single nodes of ``graph`` (see the module docstring)."""

    def __init__(self, graph: FxGraph):
        self.graph = graph
        self.gm = graph.gm
        self._slots: dict[fx.Node, fx.Node | None] = {}

    def weight_slot(self, node: fx.Node) -> fx.Node | None:
        """The ``get_attr`` argument holding ``node``'s weight (call_function nodes), else None."""
        if node not in self._slots:
            slot = None
            w = self.graph.param(node, "weight")
            if node.op == "call_function" and w is not None:
                for a in node.all_input_nodes:
                    if a.op == "get_attr" and _get_attr(self.gm, a.target) is w:
                        slot = a
                        break
            self._slots[node] = slot
        return self._slots[node]

    def run(self, node: fx.Node, env: dict[fx.Node, Any], *, weight: torch.Tensor | None = None,
            fq: dict[fx.Node, FakeQuant] | None = None) -> Any:
        slot = self.weight_slot(node) if weight is not None else None

        def load(a: fx.Node) -> Any:
            if a.op == "get_attr":
                return weight if slot is not None and a is slot else _get_attr(self.gm, a.target)
            v = env[a]
            if fq and a in fq:
                s, z, lo, hi = fq[a]
                v = torch.fake_quantize_per_tensor_affine(v, s, z, lo, hi)
            return v

        args = fx.node.map_arg(node.args, load)
        kwargs = fx.node.map_arg(node.kwargs, load)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, node.target)(*rest, **kwargs)
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            if weight is not None:
                return functional_call(mod, {"weight": weight}, tuple(args), kwargs)
            return mod(*args, **kwargs)
        raise ValueError(f"cannot run a {node.op} node ({node.name})")

    def run_nodes(self, nodes: Sequence[fx.Node], env: dict[fx.Node, Any], *,
                  weights: dict[fx.Node, torch.Tensor] | None = None,
                  fq: dict[fx.Node, dict[fx.Node, FakeQuant]] | None = None) -> dict[fx.Node, Any]:
        """Run ``nodes`` in order into ``env`` (returned); the values they read must already be there."""
        weights, fq = weights or {}, fq or {}
        for n in nodes:
            env[n] = self.run(n, env, weight=weights.get(n), fq=fq.get(n))
        return env


class Lockstep:
    """The calibration batches in a float and (optionally) a quantized environment, advanced node by node.

    ``order``: every compute node once, in a topological order (default: the graph's); ``weights``: the
    quantized model's weights by node (the caller adds to it as layers get quantized); ``fq``: per node, the
    inputs the quantized model fake-quantizes. The quantized environment starts from copies of the inputs.
    """

    def __init__(self, graph: FxGraph, batches: Iterable[tuple], *, quantized: bool = True,
                 order: Sequence[fx.Node] | None = None, weights: dict[fx.Node, torch.Tensor] | None = None,
                 fq: dict[fx.Node, dict[fx.Node, FakeQuant]] | None = None):
        self.graph = graph
        self.runner = NodeRunner(graph)
        self.order = list(order) if order is not None else graph.nodes()
        self.weights = weights if weights is not None else {}
        self.fq = fq or {}
        placeholders = graph.input_nodes()
        self.float_envs: list[dict] = []
        self.quant_envs: list[dict] | None = [] if quantized else None
        for batch in batches:
            self.float_envs.append(dict(zip(placeholders, batch)))
            if self.quant_envs is not None:
                self.quant_envs.append({p: v.clone() if isinstance(v, torch.Tensor) else v
                                        for p, v in zip(placeholders, batch)})
        # values each node is the last reader of (graph outputs are kept)
        out = graph.output_node()
        keep = set(out.all_input_nodes)
        last: dict[fx.Node, fx.Node] = {}
        for n in self.order:
            for a in n.all_input_nodes:
                if a.op != "get_attr":
                    last[a] = n
        self._frees: dict[fx.Node, list[fx.Node]] = {}
        for a, n in last.items():
            if a not in keep:
                self._frees.setdefault(n, []).append(a)

    @property
    def quantized(self) -> bool:
        return self.quant_envs is not None

    def values(self, node: fx.Node, which: str = "float") -> list[Any]:
        """``node``'s value in every batch of the ``"float"`` or ``"quant"`` environment."""
        envs = self.float_envs if which == "float" else self.quant_envs
        if envs is None:
            raise ValueError("this Lockstep has no quantized environment")
        return [env[node] for env in envs]

    @torch.no_grad()
    def step_float(self, nodes: fx.Node | Sequence[fx.Node]) -> None:
        for n in [nodes] if isinstance(nodes, fx.Node) else nodes:
            for env in self.float_envs:
                env[n] = self.runner.run(n, env)
                self._free(n, env)

    @torch.no_grad()
    def step_quant(self, nodes: fx.Node | Sequence[fx.Node]) -> None:
        if self.quant_envs is None:
            return
        for n in [nodes] if isinstance(nodes, fx.Node) else nodes:
            w, fq = self.weights.get(n), self.fq.get(n)
            for env in self.quant_envs:
                env[n] = self.runner.run(n, env, weight=w, fq=fq)
                self._free(n, env)

    def step(self, nodes: fx.Node | Sequence[fx.Node]) -> None:
        self.step_float(nodes)
        self.step_quant(nodes)

    def _free(self, node: fx.Node, env: dict) -> None:
        for a in self._frees.get(node, ()):
            env.pop(a, None)
