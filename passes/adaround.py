"""adaround: layer-wise learned rounding (AdaRound) of annotated uniform weights (`qgraph.quant.adaround`).

Each annotated Linear (``y = x Wᵀ``) and 1-d / 2-d convolution with a uniform weight spec keeps the uniform
quantizer's scale / zero point (per tensor, channel or group; optional Lp clip search) and learns, per weight,
whether it rounds down or up, so that the layer's output over the calibration data moves as little as possible:
rectified-sigmoid rounding variables, Adam, and the annealed regulariser that drives them to 0 / 1. The
reconstruction error is exact over the layer's calibration input vectors (Gram matrices of them, or the vectors
themselves while there are fewer than inputs per output), full-batch, so there is no sampling and no seed; a
layer with more than ``max_rows`` input vectors (a convolution's output positions × images) uses every k-th
position. Options: ``iters`` Adam steps per layer, ``lr``, ``reg`` (λ of the regulariser, relative: the
reconstruction loss is divided by round-to-nearest's and the regulariser averaged over the weights), ``warmup``
(fraction of steps without the regulariser).

Layer inputs (``inputs``): ``quantized`` (default) feeds the calibration data through the already-quantized
prefix (weights rounded so far, activations fake-quantized as insert-fq will) and fits ``W_soft x̂`` to the float
model's ``W x``; ``float`` uses the float model's inputs, fake-quantized when the layer's input activation is
quantized (``act_quant``), as in the AdaRound paper. Results go to ``meta["qgraph.qweight"]`` (a
`UniformWeight`, like ``quantize-weights``, which then skips these nodes); other annotated weights get
round-to-nearest. With ``keep_best`` a layer whose learned rounding is not better than round-to-nearest on the
calibration data keeps round-to-nearest. torch graphs only (symbolic_trace / torch.export).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qgraph.errors import CalibrationError, QGraphError
from qgraph.ir.fx_run import Lockstep
from qgraph.pass_base import NON_NEGATIVE, POSITIVE, POSITIVE_INT, Pass, PassResult, optional, validate
from qgraph.passes import _reconstruction as rc
from qgraph.progress import progress
from qgraph.registry import register_pass


@register_pass("adaround", after=("annotate", "calibrate"), before=("quantize-weights", "insert-fq"),
               requires=("annotated",), ensures=("weights-quantized",))
class AdaRoundPass(Pass):
    """Learn the rounding of annotated Linear / Conv weights layer by layer (uniform specs)."""

    frontends = {"fx"}
    frontend_reason = "it learns rounding by back-propagating through the graph's torch layers"

    @dataclass(frozen=True)
    class Options:
        iters: int = 500
        lr: float = 0.1
        reg: float = 3.0
        warmup: float = 0.2
        inputs: Literal["quantized", "float"] = "quantized"
        act_quant: bool = True
        clip_search: bool = False
        p: float = 2.4
        keep_best: bool = True
        max_rows: int = 65536
        max_batches: int | None = None

        def __post_init__(self):
            validate(self, **rc.LEARNED_ROUNDING_RULES, p=POSITIVE, max_rows=NON_NEGATIVE,
                     max_batches=optional(POSITIVE_INT))

    def run(self, graph, ctx) -> PassResult:
        o = self.options
        sel = rc.select(graph, "adaround")
        layers = ctx.report.setdefault("layers", [])
        rc.round_rest(graph, sel.rest, layers)
        notes = list(sel.notes)
        if sel.targets:
            data = rc.calibration(ctx, graph, "adaround", o.max_batches)
            fq = rc.fake_quant_inputs(graph, notes) if o.act_quant else {}
            quantized = o.inputs == "quantized"
            ls = Lockstep(graph, data, quantized=quantized, weights=rc.quantized_weights(graph), fq=fq)
            todo = {node: (spec, lop) for node, spec, lop in sel.targets}
            bar = progress(range(len(todo)), desc=f"adaround ({o.inputs} inputs)", enabled=ctx.progress,
                           unit="layer")
            bar_it = iter(bar)
            try:
                for node in ls.order:
                    if not todo:
                        break
                    if node in todo:
                        spec, lop = todo.pop(node)
                        row = rc.learn_layer(graph, ls, node, spec, lop, fq.get(node, {}), notes, o)
                        layers.append(row)
                        next(bar_it, None)
                    else:
                        ls.step(node)
            except QGraphError:
                raise
            except Exception as e:
                raise CalibrationError(f"adaround: the calibration data does not run through the graph "
                                       f"({type(e).__name__}: {e})") from e
            finally:
                close = getattr(bar, "close", None)
                if close:
                    close()
        if notes:
            ctx.report.setdefault("adaround", {})["notes"] = notes
        stats = {"adaround": len(sel.targets), "rtn": len(sel.rest)}
        return PassResult(graph, modified=bool(sel.targets or sel.rest), preserved=frozenset({"*"}), stats=stats)
