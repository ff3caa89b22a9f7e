"""verify: run the fake-quant simulation and the lowered graph on the same batch and compare them
node by node; report the first node whose output diverges beyond ``tol`` (relative).

Each lowered node is judged by its local error (``local_rel_err``: the node run on the simulation's values of
its inputs), where the IR can compute it. The end-to-end ``rel_err`` of a quantized model also holds rounding
flips: a float value on a rounding tie in one graph and not the other (the simulation sums products in float32,
the int8 kernels exactly in int32) moves a code by one step, and later quantizers pass that on (measured on
MiniLM W8A8: local <= 1e-6 at every node, end to end 2-5e-2)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qgraph.errors import QGraphError
from qgraph.ir.inputs import as_tuple, input_names
from qgraph.lowering import SIMULATION
from qgraph.pass_base import NON_NEGATIVE, Pass, PassResult, validate
from qgraph.registry import register_pass


def node_values(graph: Any, inputs: tuple) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Float outputs of every node (keyed by the pre-lowering node name) and the node order."""
    return graph.node_values(inputs)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


@register_pass("verify", after=("lower-bcq", "lower-embedding", "lower-int8", "lower-weight-only"),
               requires=("lowered",))
class Verify(Pass):
    @dataclass(frozen=True)
    class Options:
        tol: float = 1e-4
        strict: bool = False

        def __post_init__(self):
            validate(self, tol=NON_NEGATIVE)

    def run(self, graph, ctx) -> PassResult:
        sim = ctx.artifacts.get(SIMULATION)
        if sim is None:
            raise QGraphError("verify compares the lowered graph with the simulation kept by the lowering passes; "
                              "run a lower-* pass before verify")
        raw = ctx.config.get("verify_inputs", graph.example_inputs)
        inputs = as_tuple(raw, input_names(graph))
        sim_vals, _ = node_values(sim, inputs)
        low_vals, order = node_values(graph, inputs)
        # each lowered node also on the simulation's inputs: its own error, apart from rounding flips that
        # float-order differences upstream set off in quantizers (which the end-to-end rel_err also holds)
        local = graph.local_values(inputs, sim_vals) if graph.ir == "fx" else {}
        layers, first = [], None
        for name in order:
            if name not in sim_vals or name not in low_vals or sim_vals[name].shape != low_vals[name].shape:
                continue
            err = rel_error(low_vals[name], sim_vals[name])
            row = {"node": name, "rel_err": err}
            if name in local and local[name].shape == sim_vals[name].shape:
                row["local_rel_err"] = rel_error(local[name], sim_vals[name])
            layers.append(row)
            judged = row.get("local_rel_err", None if local else err)  # with local errors, only lowered nodes
            if first is None and judged is not None and judged > self.options.tol:
                first = name
        out_err = layers[-1]["rel_err"] if layers else 0.0
        ctx.report["verify"] = {"tol": self.options.tol, "output_rel_err": out_err, "first_divergent": first,
                                "max_rel_err": max((r["rel_err"] for r in layers), default=0.0),
                                "max_local_rel_err": max((r["local_rel_err"] for r in layers if "local_rel_err" in r),
                                                         default=None), "layers": layers}
        if first is not None and self.options.strict:
            raise QGraphError(f"verify: the lowered graph diverges from the simulation first at node {first!r} "
                              f"(relative error {next(r.get('local_rel_err', r['rel_err']) for r in layers if r['node'] == first):.3g} > "
                              f"tol {self.options.tol}); see report['verify']['layers']")
        return PassResult(graph, modified=False, preserved=frozenset({"*"}),
                          stats={"output_rel_err": out_err, "first_divergent": first})
