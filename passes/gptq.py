"""gptq: GPTQ/OPTQ weight quantization of Linear layers from calibration Hessians (`qgraph.quant.gptq`).

Each annotated Linear (``y = x Wᵀ``: nn.Linear, F.linear, aten.linear; on ONNX, Gemm and MatMul with a constant
weight — `GraphView.is_linear`) is quantized with its annotated weight
QSpec (uniform or BCQ); the options are only GPTQ's knobs. Results go to ``meta["qgraph.qweight"]``, the same
place and kind as ``quantize-weights`` (which then skips these nodes). Other annotated weights (Conv,
Gather, MatMul/addmm layouts) get plain round-to-nearest here, so the graph leaves this pass fully
weight-quantized.

Sequential mode (default): all calibration batches are stacked into one batch (they must agree in every
dimension but the batch one, and the graph must accept that batch size) and run through the graph once;
when the run reaches a layer, its Hessian comes from inputs produced by the already-quantized layers before
it, GPTQ runs, and the layer's weight is swapped for its quantized value before the layer executes (the float
weights are restored afterwards; the run stops after the last layer). Memory: the activations of the stacked
batch plus one K×K Hessian at a time. Otherwise (``sequential=false``, or batches that cannot be stacked) the
Hessians of every layer input are accumulated from the float model in one streaming pass over the batches
(memory: one K×K float64 matrix per distinct layer input), and GPTQ runs layer by layer afterwards.
"""
from __future__ import annotations

import torch

from qgraph.errors import CalibrationError
from qgraph.ir.inputs import batches
from qgraph.ir.meta import QWEIGHT_KEY
from qgraph.pass_base import Pass, PassResult
from qgraph.passes._reconstruction import round_rest
from qgraph.progress import progress
from qgraph.quant.gptq import GPTQOptions, GPTQResult, HessianAccumulator, gptq
from qgraph.quant.gptq_graph import (
    group_by_input,
    layer_row,
    quantize_in_sequence,
    select_layers,
    stack_batches,
)
from qgraph.registry import register_pass


@register_pass("gptq", after=("annotate", "calibrate"), before=("quantize-weights", "insert-fq"),
               requires=("annotated",), ensures=("weights-quantized",))
class GPTQPass(Pass):
    """Quantize annotated Linear weights with GPTQ (uniform or BCQ quantizer, from each node's weight QSpec)."""

    Options = GPTQOptions

    def run(self, graph, ctx) -> PassResult:
        todo, rest, notes = select_layers(graph)
        layers = ctx.report.setdefault("layers", [])
        if todo:
            if ctx.calibration is None:
                raise CalibrationError("gptq needs calibration data: pass calib=[batch, ...] to qgraph.quantize "
                                       "(or set PassContext.calibration), or use quantize-weights (round-to-nearest)")
            data = list(batches(ctx.calibration, graph, self.options.max_batches))
            if not data:
                raise CalibrationError("calibration data is empty: give at least one batch")
            groups = group_by_input(graph, todo)
            stacked = stack_batches(data, graph) if self.options.sequential else None
            if self.options.sequential and stacked is None:
                notes.append("calibration batches cannot be stacked into one batch: Hessians from the float model")
            mode = "sequential" if stacked is not None else "float-inputs"
            bar = iter(progress(range(len(todo)), desc=f"gptq ({mode})", enabled=ctx.progress, unit="layer"))
            run = self._sequential if stacked is not None else self._float_inputs
            for node, res in run(graph, groups, stacked if stacked is not None else data, bar):
                w = graph.param(node, "weight")
                layers.append(layer_row(graph, node, res, w))
        round_rest(graph, rest, layers)
        if notes:
            ctx.report.setdefault("gptq", {})["notes"] = notes
        stats = {"gptq": len(todo), "rtn": len(rest)}
        if todo:
            stats["mode"] = mode
        return PassResult(graph, modified=bool(todo or rest), preserved=frozenset({"*"}), stats=stats)

    # --- the two ways to get Hessians ------------------------------------------------------------
    def _quantize(self, w: torch.Tensor, h: torch.Tensor, spec) -> GPTQResult:
        return gptq(w.detach(), h, spec, **self.options.gptq_kwargs(spec))

    def _sequential(self, graph, groups, stacked, bar):
        def quantize_group(i, h, weight):
            for node, spec in groups[i]:
                yield node, self._quantize(weight(node), h, spec)

        return quantize_in_sequence(graph, groups, stacked, quantize_group, bar, "gptq")

    def _float_inputs(self, graph, groups, data, bar):
        requests = [(nodes[0][0], 0) for nodes in groups]
        accs: list[HessianAccumulator | None] = [None] * len(groups)

        def on_value(i, t):
            if accs[i] is None:
                accs[i] = HessianAccumulator(t.shape[-1])
            accs[i].add(t)

        graph.collect(requests, data, on_value)
        results = []
        for i, nodes in enumerate(groups):
            if accs[i] is None:
                raise CalibrationError(f"gptq: no calibration data reached {graph.qualname(nodes[0][0])}")
            h = accs[i].value()
            accs[i] = None
            for node, spec in nodes:
                res = self._quantize(graph.param(node, "weight"), h, spec)
                graph.meta(node)[QWEIGHT_KEY] = res.qweight
                results.append((node, res))
                next(bar, None)
        return results
