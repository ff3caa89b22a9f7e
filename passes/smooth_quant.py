"""smooth-quant: move activation outliers into the weights before static int8 activations (SmoothQuant).

For every annotated ``y = x Wᵀ`` (Linear / linear / aten.linear) whose input activation is quantized, with
per-input-channel maxima ``a_j = max|x_j|`` over the calibration data and ``w_j = max_i |W_ij|``:

    s_j = a_j^α / w_j^(1−α),    x' = x / s,    W' = W · diag(s)          (x' W'ᵀ = x Wᵀ exactly)

so channels with outlier activations get a smaller range and the weights absorb it (α = 0.5 balances
the two; Xiao et al., "SmoothQuant", 2023). Linears that read the same tensor (Q/K/V after one
LayerNorm) share one ``s`` (``w_j`` is the maximum over the group) and one inserted ``x · (1/s)``
node; that node runs in float before the activation's fake quant (a deployment folds it into the
preceding op's output scale or the quantize step). Runs between ``annotate`` and ``calibrate`` so
calibration sees the smoothed activations and ``quantize-weights`` the smoothed weights.

``alpha=auto`` (default) picks one α per model: calibration rows are sampled per group (``rows`` in all), and
for each α of ``alphas`` every group's smoothed, quantized output error (activations by their own spec,
dynamic or static; weights by theirs) is measured relative to the float output; the α with the smallest mean
over groups wins (`qgraph.quant.smoothquant`). The losses go to ``ctx.report["smooth-quant-alpha"]``.
Measured on all-MiniLM-L6-v2 W8A8 static per-tensor (x86-avx2, 64 sentences): mean cosine to fp32 0.9904
without, 0.9857 at α=0.5, 0.9950 at 0.6, 0.9973 at 0.75, 0.9972 at 0.85, 0.9921 at 1.0. On the 256 evaluation
sentences (bench/quality_minilm.py --activation-specs): static 0.9969 at α=0.75, 0.9975 with α=auto; dynamic
per-token 0.9961 without, 0.9986 with α=auto (0.65 chosen); asymmetric per-token 0.9990 (0.6 chosen).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from qgraph.errors import CalibrationError
from qgraph.ir.inputs import batches
from qgraph.ir.meta import ANNOTATION_KEY
from qgraph.pass_base import (
    FRACTION,
    POSITIVE,
    POSITIVE_INT,
    Pass,
    PassResult,
    Rule,
    each,
    option_error,
    optional,
    validate,
)
from qgraph.progress import progress
from qgraph.quant.smoothquant import best_alpha, smoothed_error, smoothing_scales
from qgraph.registry import register_pass


@register_pass("smooth-quant", after=("annotate",), before=("calibrate", "quantize-weights", "gptq"),
               requires=("annotated",))
class SmoothQuant(Pass):
    """Per-channel scaling that shifts activation range into the weights of quantized Linear inputs."""

    @dataclass(frozen=True)
    class Options:
        alpha: float | str = "auto"
        alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
        rows: int = 512
        max_batches: int | None = None
        min_scale: float = 1e-5

        def __post_init__(self):
            validate(self, alpha=ALPHA, alphas=each(FRACTION), rows=POSITIVE_INT, max_batches=optional(POSITIVE_INT),
                     min_scale=POSITIVE)
            if self.alpha == "auto" and not self.alphas:
                raise option_error("alphas", "at least one candidate with alpha=auto", self.alphas)

    def run(self, graph, ctx) -> PassResult:
        o = self.options
        groups = self._groups(graph)
        if not groups:
            return PassResult(graph, modified=False, preserved=frozenset({"*"}), stats={"smoothed": 0})
        if ctx.calibration is None:
            raise CalibrationError("smooth-quant needs calibration data for the activation ranges: pass "
                                   "calib=[batch, ...] to qgraph.quantize")
        consumers = [nodes[0] for nodes in groups.values()]
        amax: list[torch.Tensor | None] = [None] * len(consumers)
        auto = o.alpha == "auto"
        samples: list[list[torch.Tensor]] = [[] for _ in consumers]
        per_batch = max(1, o.rows // 4)

        def on_value(i, t):  # per input channel max |x| over every other dimension and batch
            flat = t.detach().reshape(-1, t.shape[-1]).float()
            m = flat.abs().amax(0)
            amax[i] = m if amax[i] is None else torch.maximum(amax[i], m)
            have = sum(len(r) for r in samples[i])
            if auto and have < o.rows:
                idx = torch.linspace(0, flat.shape[0] - 1, min(per_batch, flat.shape[0], o.rows - have)).long()
                samples[i].append(flat[idx].clone())

        data = progress(batches(ctx.calibration, graph, o.max_batches), desc="smooth-quant", enabled=ctx.progress,
                        unit="batch")
        if graph.collect([(n, 0) for n in consumers], data, on_value) == 0:
            raise CalibrationError("calibration data is empty: give at least one batch")
        alpha = self._choose_alpha(graph, ctx, groups, amax, samples) if auto else float(o.alpha)
        rows = []
        for (producer, nodes), a in zip(groups.items(), amax):
            weights = [graph.param(n, "weight").detach() for n in nodes]
            w = torch.stack([wt.abs().amax(0) for wt in weights]).amax(0).float()
            s = smoothing_scales(a, w, alpha, o.min_scale)
            for n, wt in zip(nodes, weights):
                graph.set_param(n, "weight", (wt * s.to(wt.dtype)[None, :]).to(wt.dtype))
            graph.scale_input(nodes, 0, (1.0 / s).to(torch.float32))
            rows.append({"nodes": [graph.qualname(n) for n in nodes], "channels": int(a.numel()),
                         "act_max_before": float(a.max()), "act_max_after": float((a / s).max()),
                         "s_min": float(s.min()), "s_max": float(s.max())})
        graph.recompile()
        ctx.report["smooth-quant"] = rows
        return PassResult(graph, modified=True, preserved=frozenset(),
                          stats={"smoothed": sum(len(r["nodes"]) for r in rows), "groups": len(rows),
                                 "alpha": alpha})

    def _choose_alpha(self, graph, ctx, groups: dict, amax: list, samples: list) -> float:
        """The grid α with the smallest mean relative output error of the quantized, smoothed layers."""
        o = self.options
        cases = []
        for (_, nodes), a, rows in zip(groups.items(), amax, samples):
            anns = [graph.meta(n)[ANNOTATION_KEY] for n in nodes]
            weights = [graph.param(n, "weight").detach().float() for n in nodes]
            cases.append((torch.cat(rows), weights, a, anns[0].inputs[0], [ann.weight for ann in anns]))
        losses = {}
        for alpha in progress(o.alphas, desc="smooth-quant alpha", enabled=ctx.progress, unit="alpha"):
            losses[float(alpha)] = sum(smoothed_error(x, ws, a, alpha, act, wspecs, o.min_scale)
                                       for x, ws, a, act, wspecs in cases) / len(cases)
        chosen = best_alpha(losses)
        ctx.report["smooth-quant-alpha"] = {"chosen": chosen, "losses": losses}
        return chosen

    @staticmethod
    def _groups(graph) -> dict:
        """Annotated x Wᵀ nodes with a quantized input 0, grouped by the node producing that input."""
        groups: dict = defaultdict(list)
        for node in graph.nodes():
            ann = graph.meta(node).get(ANNOTATION_KEY)
            if ann is None or ann.inputs.get(0) is None or not graph.is_linear(node):
                continue
            groups[graph.inputs(node)[0]].append(node)
        # a weight read elsewhere too (tied) must not be scaled
        return {p: nodes for p, nodes in groups.items() if not any(graph.shares_weight(n) for n in nodes)}


ALPHA = Rule(lambda a: a == "auto" or (not isinstance(a, (bool, str)) and isinstance(a, (int, float))
                                       and 0.0 <= a <= 1.0), "'auto' or a number in [0, 1]")
