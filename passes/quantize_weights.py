"""quantize-weights: quantize each annotated weight (uniform codes or a BCQ code) into node meta."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qgraph.ir.meta import ANNOTATION_KEY, QWEIGHT_KEY
from qgraph.pass_base import POSITIVE, Pass, PassResult, validate
from qgraph.progress import progress
from qgraph.quant import uniform
from qgraph.quant.bcq import quantize_bcq_spec
from qgraph.quant.qtensor import UniformWeight
from qgraph.registry import register_pass


@register_pass("quantize-weights", after=("annotate", "calibrate"), requires=("annotated",),
               ensures=("weights-quantized",))
class QuantizeWeights(Pass):
    """Uniform weights get (codes, scale, zero point), optionally with an Lp clip search; BCQ weights
    get a `BCQWeight` by the spec's method (greedy / alternating / weighted)."""

    @dataclass(frozen=True)
    class Options:
        clip_search: bool = False
        p: float = 2.4

        def __post_init__(self):
            validate(self, p=POSITIVE)

    def run(self, graph, ctx) -> PassResult:
        todo = []
        for node in graph.nodes():
            ann = graph.meta(node).get(ANNOTATION_KEY)
            if ann is not None and ann.weight is not None and QWEIGHT_KEY not in graph.meta(node):
                todo.append((node, ann.weight))
        layers = ctx.report.setdefault("layers", [])
        for node, spec in progress(todo, desc="quantize-weights", enabled=ctx.progress, unit="layer"):
            w = graph.param(node, "weight").detach()
            q = quantize_tensor(w, spec, clip_search=self.options.clip_search, p=self.options.p)
            graph.meta(node)[QWEIGHT_KEY] = q
            err = float((dequantized(q, w) - w).norm() / w.norm().clamp_min(1e-30))
            layers.append({"node": graph.qualname(node), "op": graph.op_type(node), "spec": str(spec),
                           "rel_weight_err": err, "fp32_bytes": w.numel() * 4, "bytes": int(q.nbytes)})
        return PassResult(graph, modified=bool(todo), preserved=frozenset({"*"}), stats={"quantized": len(todo)})


def quantize_tensor(w: torch.Tensor, spec, *, clip_search: bool = False, p: float = 2.4):
    """A `UniformWeight` or `BCQWeight` for ``w`` under ``spec``."""
    if spec.scheme == "bcq":
        return quantize_bcq_spec(w.detach().float(), spec)
    codes, scale, zp = uniform.quantize_weight(w.detach().float(), spec, clip_search=clip_search, p=p)
    return UniformWeight(codes, scale, zp, spec)


def dequantized(qweight, like: torch.Tensor) -> torch.Tensor:
    """The float weight a quantized weight stands for, in ``like``'s shape and dtype."""
    return qweight.dequantize().reshape(like.shape).to(like.dtype)
