"""clip-search: choose clipping ranges on the calibration loss (LAPQ-style joint search, or Q-Rater).

Units: every annotated node's uniform weight (when no earlier pass quantized it) and every calibrated
activation input. Each unit's range starts from a per-layer Lp initialisation (``p``, default 2.4): the
weight's per-channel / per-group ranges shrunk by the Lp clip search of `qgraph.quant.uniform`, the
activation range from ``calibrate`` shrunk by the same search over a sample of its calibration values.
The start is the best (on the calibration loss) of the four combinations of {Lp, min/max} ranges for the
weights and {Lp, calibrate's} ranges for the activations; all-min/max is what the pipeline does without
this pass.

The variable of a unit is one log scale c on its start range, in ``[min_scale, max_scale]`` (a weight
range never grows past the weight's min/max). The calibration loss is the MSE between the fake-quantized
model's outputs and the float model's (``loss=kl``: the KL divergence of the softmax over the last dim, for
classifiers). It reads up to ``max_batches`` calibration batches (default 16) and holds out the last
``holdout`` fraction of them (default 0.25, at least one batch when there are two or more): the search runs
on the others, and min/max, the start and the search's result are then measured on the held-out batches and
the best of them is kept (``kept`` and ``holdout_loss_*`` in the stats). With few batches a search of ~100
ranges fits its own batches: on MobileNetV2 W4A8 with 4 batches it used to end below round-to-nearest on
held-out photos. It runs on a copy of the graph whose
fake-quant nodes read their qparams from modules, so an evaluation is one forward pass per batch.

- joint (default, LAPQ): coordinate descent in log space along the all-weights and all-activations
  directions and then along each unit (steps ±``step``, halved after a sweep with no gain), or
  ``method=powell`` (scipy.optimize.minimize over the same vector); ``evals`` evaluations at most.
- ``qrater=true`` (Q-Rater): layer by layer in topological order, search that layer's weight clip scale,
  its weight rounding threshold t ∈ [0.3, 0.7] (codes ⌊w/s + 1 − t⌋ + z; t = 0.5 is round to nearest)
  and its activation clip scales on the model-output loss, with the earlier layers quantized and frozen
  and the later ones still float; then freeze it. ``evals`` is shared out over the layers.

The best point seen is kept: the result's calibration loss (on the search batches) is never above the
start's (both are in the stats: ``loss_minmax``, ``loss_lp`` (all Lp), ``loss_start``, ``loss``; ``loss`` is
the search-batch loss of what the pass returns). Results: weights as `UniformWeight` in
``meta["qgraph.qweight"]`` (quantize-weights skips them), activation qparams overwrite calibrate's
``meta["qgraph.qparams"]``; per-unit choices go to ``ctx.report["clip_search"]``. BCQ weights are not
clipped (they are simulated as quantize-weights will make them, and left to it). torch.fx graphs only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from qgraph.errors import CalibrationError, PipelineError, SpecError
from qgraph.ir.inputs import batches
from qgraph.ir.meta import ANNOTATION_KEY, QPARAMS_KEY, QWEIGHT_KEY
from qgraph.pass_base import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    Pass,
    PassResult,
    at_least,
    in_range,
    optional,
    validate,
)
from qgraph.passes.quantize_weights import dequantized, quantize_tensor
from qgraph.progress import progress
from qgraph.quant.clip_search import ActUnit, Layer, Search, Sim, WeightUnit, output_tensors
from qgraph.registry import register_pass


@register_pass("clip-search", after=("annotate", "calibrate"), before=("quantize-weights", "insert-fq"),
               requires=("annotated",))
class ClipSearch(Pass):
    """Search per-layer clipping of weights and activations on the calibration loss (module docstring)."""

    frontends = {"fx"}
    frontend_reason = "its simulation harness edits and runs the torch.fx graph many times"

    @dataclass(frozen=True)
    class Options:
        evals: int = 200
        p: float = 2.4
        loss: Literal["mse", "kl"] = "mse"
        method: Literal["coordinate", "powell"] = "coordinate"
        qrater: bool = False
        weights: bool = True
        activations: bool = True
        step: float = 0.2
        min_scale: float = 0.5
        max_scale: float = 2.0
        max_batches: int | None = 16
        holdout: float = 0.25
        samples: int = 1 << 16

        def __post_init__(self):
            validate(self, evals=NON_NEGATIVE, p=POSITIVE, step=POSITIVE, min_scale=in_range(0, 1, lo_open=True),
                     max_scale=at_least(1), max_batches=optional(POSITIVE_INT), samples=POSITIVE_INT,
                     holdout=in_range(0, 1, hi_open=True))

    def run(self, graph, ctx) -> PassResult:
        o = self.options
        layers, notes = self._select(graph)
        n_units = sum(len(u.units) for u in layers)
        if n_units == 0:
            if any(lay.fixed_bcq for lay in layers):
                raise SpecError("clip-search clips uniform weights and activations; this graph has only BCQ "
                                "weights (no range to clip) and no quantized activations: annotate a uniform "
                                "scheme or act_bits, or drop clip-search")
            return PassResult(graph, modified=False, preserved=frozenset({"*"}), stats={"units": 0})
        if ctx.calibration is None:
            raise CalibrationError("clip-search minimises the loss on calibration data: pass calib=[batch, ...] "
                                   "to qgraph.quantize (or set PassContext.calibration)")
        data = list(batches(ctx.calibration, graph, o.max_batches))
        if not data:
            raise CalibrationError("calibration data is empty: give at least one batch")
        n_hold = min(len(data) - 1, round(len(data) * o.holdout)) if o.holdout > 0 else 0
        if o.holdout > 0 and len(data) > 1:
            n_hold = max(1, n_hold)
        held = data[len(data) - n_hold:]
        data = data[:len(data) - n_hold]
        with torch.no_grad():
            refs = [output_tensors(graph(*b)) for b in data]
            if not refs[0]:
                raise CalibrationError("clip-search: the model returns no floating-point tensor to compare")
            self._init_activations(graph, layers, data, ctx.seed)
            for lay in layers:
                for u in lay.units:
                    u.init(o.p)
            sim = Sim(graph, layers, data, refs, o.loss)
            total = o.evals + 5 + (3 if held else 0)
            bar = iter(progress(range(total), desc="clip-search" + (" (q-rater)" if o.qrater else ""),
                                enabled=ctx.progress, unit="eval"))
            search = Search(sim, layers, o, bar)
            result = search.run()
            kept = None
            if held:
                kept = search.holdout(result, held, [output_tensors(graph(*b)) for b in held])
                result.choice = kept.choice
                result.loss = {"minmax": result.loss_minmax, "start": result.loss_start}.get(kept.kept, result.loss)
        for lay in layers:
            for u in lay.units:
                u.write(graph, result.choice[u])
        report = ctx.report.setdefault("clip_search", {})
        report["units"] = [u.row(result.choice[u]) for lay in layers for u in lay.units]
        if notes:
            report["notes"] = notes
        stats = {"weights": sum(isinstance(u, WeightUnit) for lay in layers for u in lay.units),
                 "activations": sum(isinstance(u, ActUnit) for lay in layers for u in lay.units),
                 "mode": "qrater" if o.qrater else o.method, "evals": sim.evals, "start": result.start,
                 "loss_minmax": result.loss_minmax, "loss_lp": result.loss_lp, "loss_start": result.loss_start,
                 "loss": result.loss, "batches": len(data), "holdout_batches": len(held)}
        if kept is not None:
            stats.update({"kept": kept.kept, **{f"holdout_loss_{k}": v for k, v in kept.losses.items()}})
        report.update(stats)
        return PassResult(graph, modified=True, preserved=frozenset({"*"}), stats=stats)

    # --- which units ---------------------------------------------------------------------------------
    def _select(self, graph):
        o = self.options
        layers, notes = [], []
        for node in graph.nodes():
            meta = graph.meta(node)
            ann = meta.get(ANNOTATION_KEY)
            if ann is None or not ann.is_quantized:
                continue
            lay = Layer(graph.name(node), graph.qualname(node))
            w = graph.param(node, "weight")
            have = meta.get(QWEIGHT_KEY)
            if ann.weight is not None and w is not None:
                if have is not None:
                    lay.fixed = dequantized(have, w)
                    notes.append(f"{lay.qualname}: weight already quantized ({type(have).__name__}); kept")
                elif ann.weight.scheme != "uniform":
                    lay.fixed = dequantized(quantize_tensor(w.detach(), ann.weight), w)
                    lay.fixed_bcq = True
                    notes.append(f"{lay.qualname}: {ann.weight} is BCQ, not clipped (left to quantize-weights)")
                elif o.weights:
                    lay.units.append(WeightUnit(lay, node, w.detach().to(torch.float32), ann.weight))
                else:
                    lay.fixed = dequantized(quantize_tensor(w.detach(), ann.weight), w)
            if o.activations:
                qparams = meta.get(QPARAMS_KEY, {})
                for idx, spec in sorted(ann.inputs.items()):
                    if f"input{idx}" not in qparams:
                        raise PipelineError(f"clip-search: activation input {idx} of {graph.name(node)} has no "
                                            f"qparams; run 'calibrate' before 'clip-search'")
                    if spec.granularity != "tensor":
                        raise SpecError(f"clip-search clips per-tensor activations only; {graph.name(node)} input "
                                        f"{idx} is {spec}")
                    lay.units.append(ActUnit(lay, node, idx, spec, qparams[f"input{idx}"]))
            elif ann.inputs:
                lay.fixed_acts = True
            layers.append(lay)
        return layers, notes

    def _init_activations(self, graph, layers, data, seed: int) -> None:
        """Keep a random sample of each activation unit's calibration values (for its Lp init)."""
        acts = [u for lay in layers for u in lay.units if isinstance(u, ActUnit)]
        if not acts:
            return
        gen = torch.Generator().manual_seed(seed)
        per_batch = max(1, self.options.samples // len(data))

        def on_value(i, t):
            flat = t.detach().reshape(-1).to(torch.float32)
            if flat.numel() > per_batch:
                flat = flat[torch.randint(flat.numel(), (per_batch,), generator=gen)]
            acts[i].samples.append(flat)

        graph.collect([(u.node, u.idx) for u in acts], data, on_value)
