"""fold-bn: fold an inference-mode BatchNorm into the Conv that feeds it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qgraph.pass_base import Pass, PassResult
from qgraph.registry import register_pass


@register_pass("fold-bn", before=("annotate",), ensures=("bn-folded",))
class FoldBatchNorm(Pass):
    """Conv → BatchNorm(eval) becomes one Conv with W' = W·γ/σ and b' = (b − μ)·γ/σ + β."""

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph, ctx) -> PassResult:
        folded = 0
        for bn in list(graph.nodes()):
            if graph.op_type(bn) != "BatchNormalization":
                continue
            ins = graph.producers(bn)
            if len(ins) != 1 or ins[0] is None or graph.op_type(ins[0]) != "Conv" or len(graph.users(ins[0])) != 1:
                continue
            conv = ins[0]
            eps = _bn_eps(graph, bn)
            if eps is None or graph.shares_weight(conv):
                continue
            folded += _fold(graph, conv, bn, eps)
        if folded:
            graph.recompile()
        return PassResult(graph, modified=folded > 0, stats={"folded": folded})


def _bn_eps(graph, bn) -> float | None:
    """The BatchNorm's epsilon, or None when it normalizes with batch statistics (training mode)."""
    if graph.attribute(bn, "training_mode", 0):
        return None
    eps = graph.attribute(bn, "epsilon")
    return None if eps is None else float(eps)


def _fold(graph, conv, bn, eps: float) -> bool:
    w = graph.param(conv, "weight")
    mean = graph.param(bn, "running_mean")
    var = graph.param(bn, "running_var")
    if w is None or mean is None or var is None:
        return False  # computed at run time: nothing to fold
    gamma = graph.param(bn, "weight")
    beta = graph.param(bn, "bias")
    gamma = torch.ones_like(var) if gamma is None else gamma
    beta = torch.zeros_like(var) if beta is None else beta
    bias = graph.param(conv, "bias")
    bias = torch.zeros_like(mean) if bias is None else bias
    with torch.no_grad():
        scale = gamma / torch.sqrt(var + eps)
        new_w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        new_b = (bias - mean) * scale + beta
    graph.set_param(conv, "weight", new_w.to(w.dtype))
    graph.set_param(conv, "bias", new_b.to(w.dtype))
    graph.replace_node(bn, conv)
    return True
