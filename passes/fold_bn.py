"""fold-bn: fold an inference-mode BatchNorm into the Conv that feeds it."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from qgraph.pass_base import Pass, PassResult
from qgraph.registry import register_pass

_BN_EPS_ARG = {"batch_norm": 7, "_native_batch_norm_legit_no_training": 6}


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
            if eps is None or not _conv_owned_once(graph, conv):
                continue
            _fold(graph, conv, bn, eps)
            folded += 1
        if folded:
            graph.recompile()
        return PassResult(graph, modified=folded > 0, stats={"folded": folded})


def _bn_eps(graph, bn) -> float | None:
    if graph.frontend == "onnx":
        eps = bn.attributes.get("epsilon")
        training = bn.attributes.get("training_mode")
        return None if training is not None and training.value else (eps.value if eps is not None else 1e-5)
    mod = graph.module_of(bn)
    if mod is not None:
        return None if mod.training or mod.running_var is None else float(mod.eps)
    name = bn.target.overloadpacket.__name__
    if name == "batch_norm" and bn.args[5]:  # training=True: statistics come from the batch
        return None
    idx = _BN_EPS_ARG.get(name)
    return float(graph.literal_arg(bn, idx, 1e-5)) if idx is not None else None


def _conv_owned_once(graph, conv) -> bool:
    if graph.frontend == "onnx" or conv.op != "call_module":
        return True
    return sum(1 for n in graph.nodes() if n.op == "call_module" and n.target == conv.target) == 1


def _fold(graph, conv, bn, eps: float) -> None:
    w = graph.param(conv, "weight")
    mean = graph.param(bn, "running_mean")
    var = graph.param(bn, "running_var")
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
    # _native_batch_norm_legit_no_training returns (out, mean, invstd): its users index the tuple.
    for user in list(graph.users(bn)) if graph.frontend != "onnx" else []:
        if user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0:
            graph.replace_all_uses(user, conv)
            graph.erase(user)
    graph.replace_all_uses(bn, conv)
    graph.erase(bn)
