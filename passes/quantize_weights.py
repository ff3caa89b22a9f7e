"""quantize-weights: quantize each annotated weight (uniform codes or a BCQ code) into node meta.

BCQ weights of ``y = x Wᵀ`` layers with the ``weighted`` method take their importance from activation
statistics when calibration data is there (``bcq_importance=auto``, the default; ``activation`` insists on it,
``spec`` keeps the spec's data-free magnitude importance): ``m = E[x_k²]`` per input channel
(`qgraph.quant.importance`), read from up to ``max_batches`` calibration batches. Round-to-nearest still: no
Hessian inverse, no reconstruction. Measured on SmolLM2-135M (bench/quality_llm.py, fp32 perplexity 36.7):
BCQ-3+z g192 767 with magnitude importance, 81.7 with this; g64 64.0; BCQ-4+z g192 45.0.

The RTN check (``rtn_check`` > 0): each BCQ Linear's relative output error on the first ``check_tokens`` rows of
the first calibration batch (the example inputs when there is no calibration data), over all those rows and on
the worst row alone (one token gone wrong, e.g. an attention sink, can wreck a language model), is compared with
that of round-to-nearest uniform codes of the same bits and groups; layers worse by more than ``rtn_check`` times
on either are named in one warning. The default 2x: SmolLM2's data-free BCQ-3 g192 (perplexity 7,000 against
RTN-3's 120 on 2 windows) has no layer 3x worse than RTN-3; its worst, v_proj of layers 3-7 and 23, are
2.2-2.6x on the sink token, and those 6 pass 2x. Flagged layers also go to ``report["quantize-weights"]``,
so a data-free BCQ that collapses does not go unnoticed.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from qgraph.errors import CalibrationError, SpecError
from qgraph.ir.inputs import batches
from qgraph.ir.meta import ANNOTATION_KEY, QWEIGHT_KEY
from qgraph.pass_base import NON_NEGATIVE, POSITIVE, POSITIVE_INT, Pass, PassResult, optional, validate
from qgraph.progress import progress
from qgraph.quant import block_scaled, uniform
from qgraph.quant.bcq import quantize_bcq_spec
from qgraph.quant.importance import ChannelMoments, activation_importance, output_errors
from qgraph.quant.qspec import QSpec
from qgraph.quant.qtensor import UniformWeight
from qgraph.registry import register_pass


@register_pass("quantize-weights", after=("annotate", "calibrate"), requires=("annotated",),
               ensures=("weights-quantized",))
class QuantizeWeights(Pass):
    """Uniform weights get (codes, scale, zero point), optionally with an Lp clip search; BCQ weights
    get a `BCQWeight` by the spec's method (greedy / alternating / weighted), the weighted method with
    activation-statistics importance when calibration data is given."""

    @dataclass(frozen=True)
    class Options:
        clip_search: bool = False
        p: float = 2.4
        bcq_importance: Literal["auto", "activation", "spec"] = "auto"
        max_batches: int | None = 8
        rtn_check: float = 2.0
        check_tokens: int = 256

        def __post_init__(self):
            validate(self, p=POSITIVE, max_batches=optional(POSITIVE_INT), rtn_check=NON_NEGATIVE,
                     check_tokens=POSITIVE_INT)

    def run(self, graph, ctx) -> PassResult:
        o = self.options
        todo = []
        for node in graph.nodes():
            ann = graph.meta(node).get(ANNOTATION_KEY)
            if ann is not None and ann.weight is not None and QWEIGHT_KEY not in graph.meta(node):
                todo.append((node, ann.weight))
        bcq_linears = [n for n, s in todo if s.scheme == "bcq" and graph.is_linear(n)]
        use_act = o.bcq_importance == "activation" or (o.bcq_importance == "auto" and ctx.calibration is not None)
        act_nodes = [n for n, s in todo if use_act and n in bcq_linears and s.bcq_method == "weighted"]
        check_nodes = bcq_linears if o.rtn_check > 0 else []
        moments, samples = self._statistics(graph, ctx, act_nodes, check_nodes)

        layers = ctx.report.setdefault("layers", [])
        flagged: list[tuple[str, float]] = []
        for node, spec in progress(todo, desc="quantize-weights", enabled=ctx.progress, unit="layer"):
            w = graph.param(node, "weight").detach()
            key = graph.inputs(node)[0] if spec.scheme == "bcq" and graph.is_linear(node) else None
            imp = activation_importance(w.reshape(w.shape[0], -1).float(), moments[key].mean_square()) \
                if node in act_nodes else None
            q = quantize_tensor(w, spec, clip_search=o.clip_search, p=o.p, importance=imp)
            graph.meta(node)[QWEIGHT_KEY] = q
            w_hat = dequantized(q, w)
            err = float((w_hat - w).norm() / w.norm().clamp_min(1e-30))
            row = {"node": graph.qualname(node), "op": graph.op_type(node), "spec": str(spec),
                   "rel_weight_err": err, "fp32_bytes": w.numel() * 4, "bytes": int(q.nbytes)}
            if node in act_nodes:
                row["importance"] = "activation"
            if key is not None and key in samples:
                ratio = _rtn_ratio(samples[key], w, w_hat, spec, row)
                if ratio is not None and ratio > o.rtn_check:
                    flagged.append((row["node"], ratio))
            layers.append(row)
        stats = {"quantized": len(todo)}
        if act_nodes:
            stats["activation_importance"] = len(act_nodes)
        if check_nodes:
            stats["rtn_flagged"] = len(flagged)
            ctx.report["quantize-weights"] = {"rtn_check": o.rtn_check, "flagged": [n for n, _ in flagged]}
        if flagged:
            worst = max(flagged, key=lambda f: f[1])
            warnings.warn(
                f"quantize-weights: {len(flagged)} BCQ layer(s) have an output error on calibration tokens more "
                f"than {o.rtn_check:g}x that of round-to-nearest uniform codes (worst {worst[0]}: "
                f"{worst[1]:.1f}x): {', '.join(n for n, _ in flagged)}. Weigh by activation statistics "
                "(calibration data with bcq_importance=auto or activation), use offset=true, or quantize with gptq",
                stacklevel=2)
        return PassResult(graph, modified=bool(todo), preserved=frozenset({"*"}), stats=stats)

    def _statistics(self, graph, ctx, act_nodes: list, check_nodes: list) -> tuple[dict, dict]:
        """``E[x²]`` per layer input of ``act_nodes`` (over up to ``max_batches`` calibration batches) and the
        first ``check_tokens`` input rows of the first batch per input of ``check_nodes``, keyed by the node
        producing that input."""
        o = self.options
        keys = list(dict.fromkeys(graph.inputs(n)[0] for n in act_nodes + check_nodes))
        if not keys:
            return {}, {}
        consumer = {graph.inputs(n)[0]: n for n in reversed(act_nodes + check_nodes)}
        act_keys = {graph.inputs(n)[0] for n in act_nodes}
        check_keys = {graph.inputs(n)[0] for n in check_nodes}
        data = ctx.calibration
        if data is None:
            if act_keys:
                raise CalibrationError("quantize-weights: bcq_importance=activation needs calibration data: pass "
                                       "calib=[batch, ...] to qgraph.quantize, or use bcq_importance=spec")
            example = tuple(getattr(graph, "example_inputs", ()) or ())
            if not example:
                return {}, {}
            data = [example]
        moments = {k: ChannelMoments() for k in act_keys}
        samples: dict = {}
        first = [True]

        def on_value(i, t):
            k = keys[i]
            if k in moments:
                moments[k].add(t)
            if first[0] and k in check_keys and k not in samples:
                samples[k] = t.detach().reshape(-1, t.shape[-1])[: o.check_tokens].float().clone()

        limit = o.max_batches if act_keys else 1
        count = 0
        for batch in progress(batches(data, graph, limit), desc="quantize-weights statistics",
                              enabled=ctx.progress and bool(act_keys), unit="batch"):
            graph.collect([(consumer[k], 0) for k in keys], [batch], on_value)
            first[0] = False
            count += 1
        if count == 0 and act_keys:
            raise CalibrationError("calibration data is empty: give at least one batch")
        return moments, samples


def _rtn_ratio(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor, spec: QSpec, row: dict) -> float | None:
    """Output error of ``w_hat`` over that of round-to-nearest uniform codes with the spec's bits and groups."""
    w2 = w.reshape(w.shape[0], -1).float()
    gran = {"granularity": "group", "group_size": spec.group_size} if spec.group_size else {"granularity": "channel"}
    try:
        ref = QSpec.uniform(min(8, max(2, spec.bits)), symmetric=False, **gran)
        codes, scale, zp = uniform.quantize_weight(w2, ref)
    except SpecError:
        return None
    rtn_hat = UniformWeight(codes, scale, zp, ref).dequantize().reshape(w2.shape)
    ours, ours_token = output_errors(x, w2, w_hat.reshape(w2.shape).float())
    rtn, rtn_token = output_errors(x, w2, rtn_hat)
    row["rel_output_err"], row["rtn_output_err"] = ours, rtn
    row["worst_token_err"], row["rtn_worst_token_err"] = ours_token, rtn_token
    return max(ours / max(rtn, 1e-12), ours_token / max(rtn_token, 1e-12))


def quantize_tensor(w: torch.Tensor, spec, *, clip_search: bool = False, p: float = 2.4,
                    importance: torch.Tensor | None = None):
    """A `UniformWeight` or `BCQWeight` for ``w`` under ``spec`` (``importance``: the weighted BCQ method's
    per-element importance over ``w`` viewed as ``[out, -1]``; None: the spec's own)."""
    if spec.scheme == "bcq":
        return quantize_bcq_spec(w.detach().float(), spec, importance=importance)
    if spec.scale_bits is not None:
        if clip_search:
            raise SpecError(f"clip_search does not apply to block-scaled specs ({spec}); their grid is fitted once")
        return block_scaled.quantize(w.detach().float().reshape(w.shape[0], -1), spec)
    codes, scale, zp = uniform.quantize_weight(w.detach().float(), spec, clip_search=clip_search, p=p)
    return UniformWeight(codes, scale, zp, spec)


def dequantized(qweight, like: torch.Tensor) -> torch.Tensor:
    """The float weight a quantized weight stands for, in ``like``'s shape and dtype."""
    return qweight.dequantize().reshape(like.shape).to(like.dtype)
