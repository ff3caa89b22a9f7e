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

from dataclasses import dataclass
from typing import Literal

import torch

from qgraph.errors import CalibrationError, QGraphError
from qgraph.ir.inputs import batches
from qgraph.ir.meta import ANNOTATION_KEY, QWEIGHT_KEY
from qgraph.pass_base import NON_NEGATIVE, POSITIVE, POSITIVE_INT, Pass, PassResult, optional, validate
from qgraph.passes._reconstruction import round_rest
from qgraph.progress import progress
from qgraph.quant.gptq import GPTQResult, HessianAccumulator, gptq
from qgraph.registry import register_pass

#: Ranges of GPTQ's options (shared with aespa, which takes the same knobs).
GPTQ_RULES = {"block": POSITIVE_INT, "damp": NON_NEGATIVE, "p": POSITIVE, "max_batches": optional(POSITIVE_INT)}


class _Finished(Exception):
    """Raised from the last tap to stop the calibration run early."""


@register_pass("gptq", after=("annotate", "calibrate"), before=("quantize-weights", "insert-fq"),
               requires=("annotated",), ensures=("weights-quantized",))
class GPTQPass(Pass):
    """Quantize annotated Linear weights with GPTQ (uniform or BCQ quantizer, from each node's weight QSpec)."""

    @dataclass(frozen=True)
    class Options:
        block: int = 128
        damp: float = 0.01
        act_order: bool = False
        sequential: bool = True
        clip_search: bool = False
        p: float = 2.4
        bcq_importance: Literal["spec", "hessian"] = "spec"
        max_batches: int | None = None

        def __post_init__(self):
            validate(self, **GPTQ_RULES)

    def run(self, graph, ctx) -> PassResult:
        todo, rest, notes = self._select(graph)
        layers = ctx.report.setdefault("layers", [])
        if todo:
            if ctx.calibration is None:
                raise CalibrationError("gptq needs calibration data: pass calib=[batch, ...] to qgraph.quantize "
                                       "(or set PassContext.calibration), or use quantize-weights (round-to-nearest)")
            data = list(batches(ctx.calibration, graph, self.options.max_batches))
            if not data:
                raise CalibrationError("calibration data is empty: give at least one batch")
            groups = _by_input(graph, todo)
            stacked = _stack(data, graph) if self.options.sequential else None
            if self.options.sequential and stacked is None:
                notes.append("calibration batches cannot be stacked into one batch: Hessians from the float model")
            mode = "sequential" if stacked is not None else "float-inputs"
            bar = iter(progress(range(len(todo)), desc=f"gptq ({mode})", enabled=ctx.progress, unit="layer"))
            run = self._sequential if stacked is not None else self._float_inputs
            for node, res in run(graph, groups, stacked if stacked is not None else data, bar):
                w = graph.param(node, "weight")
                layers.append(_layer_row(graph, node, res, w))
        round_rest(graph, rest, layers)
        if notes:
            ctx.report.setdefault("gptq", {})["notes"] = notes
        stats = {"gptq": len(todo), "rtn": len(rest)}
        if todo:
            stats["mode"] = mode
        return PassResult(graph, modified=bool(todo or rest), preserved=frozenset({"*"}), stats=stats)

    # --- which nodes ---------------------------------------------------------------------------
    def _select(self, graph):
        todo, rest, notes = [], [], []
        for node in graph.nodes():
            meta = graph.meta(node)
            ann = meta.get(ANNOTATION_KEY)
            if ann is None or ann.weight is None or QWEIGHT_KEY in meta:
                continue
            spec = ann.weight
            why = _not_gptq_able(graph, node, spec)
            if why:
                notes.append(f"{graph.qualname(node)}: {why}; round-to-nearest")
                rest.append((node, spec))
            else:
                todo.append((node, spec))
        return todo, rest, notes

    # --- the two ways to get Hessians ------------------------------------------------------------
    def _quantize(self, w: torch.Tensor, h: torch.Tensor, spec) -> GPTQResult:
        o = self.options
        return gptq(w.detach(), h, spec, block=o.block, damp=o.damp, act_order=o.act_order,
                    clip_search=o.clip_search and spec.scheme == "uniform", p=o.p, bcq_importance=o.bcq_importance)

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


def quantize_in_sequence(graph, groups, stacked, quantize_group, bar, pass_name: str) -> list:
    """Run the stacked calibration batch through the graph; at each input group's tap,
    ``quantize_group(i, h, weight)`` yields ``(node, result)`` for that group from its Hessian ``h``
    (``weight(node)``: the float weight). Each result's ``w_hat`` becomes the layer's weight at once, so later
    groups see the quantized prefix; the float weights are put back at the end. Returns every
    ``(node, result)`` in order.

    On a graph whose taps run inside the forward (``live_collect``: torch.fx) that is one run, the weights
    swapped in place as the run reaches each layer; otherwise (ONNX: values come back after a run) one run per
    group, each with the weights quantized so far."""
    results = []
    if not graph.live_collect:
        saved: dict = {}

        def weight_of(node):
            return saved[node] if node in saved else graph.param(node, "weight").detach().clone()

        try:
            for i, nodes in enumerate(groups):
                seen: list = []
                graph.collect([(nodes[0][0], 0)], [stacked], lambda _, t: seen.append(t))
                acc = HessianAccumulator(seen[0].shape[-1])
                acc.add(seen[0])
                for node, res in quantize_group(i, acc.value(), weight_of):
                    w = weight_of(node)
                    saved.setdefault(node, w)
                    graph.meta(node)[QWEIGHT_KEY] = res.qweight
                    graph.set_param(node, "weight", res.w_hat.reshape(w.shape).to(w.dtype))
                    results.append((node, res))
                    next(bar, None)
        except QGraphError:
            raise
        except Exception as e:
            raise _stacking_error(e, stacked, pass_name) from e
        finally:
            for node, w in saved.items():
                graph.set_param(node, "weight", w)
        return results

    requests = [(nodes[0][0], 0) for nodes in groups]
    saved_p: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    done = [0]

    def weight(node):
        p = graph.param(node, "weight")
        return saved_p[id(p)][1] if id(p) in saved_p else p.detach().clone()

    def on_value(i, t):
        acc = HessianAccumulator(t.shape[-1])
        acc.add(t)
        for node, res in quantize_group(i, acc.value(), weight):
            p = graph.param(node, "weight")
            w = weight(node)
            graph.meta(node)[QWEIGHT_KEY] = res.qweight
            saved_p.setdefault(id(p), (p, w))
            with torch.no_grad():
                p.copy_(res.w_hat.reshape(p.shape).to(p.dtype))
            results.append((node, res))
            next(bar, None)
        done[0] += 1
        if done[0] == len(groups):
            raise _Finished

    try:
        graph.collect(requests, [stacked], on_value)
    except _Finished:
        pass
    except QGraphError:
        raise
    except Exception as e:
        raise _stacking_error(e, stacked, pass_name) from e
    finally:
        with torch.no_grad():
            for p, w in saved_p.values():
                p.copy_(w)
    if done[0] != len(groups):
        raise CalibrationError(f"{pass_name}: the calibration run reached only {done[0]} of {len(groups)} "
                               f"layer inputs")
    return results


def _stacking_error(e: Exception, stacked, pass_name: str) -> CalibrationError:
    rows = next((t.shape[0] for t in stacked if isinstance(t, torch.Tensor)), "?")
    return CalibrationError(f"{pass_name}: the calibration batches stacked into one batch of {rows} do not run "
                            f"through the graph ({type(e).__name__}: {e}); use {pass_name}{{sequential=false}} "
                            f"or fewer batches")


def _not_gptq_able(graph, node, spec) -> str:
    """Why a node cannot take GPTQ ('' when it can)."""
    if graph.op_type(node) not in ("Gemm", "MatMul"):
        return f"{graph.op_type(node)} is not a Linear"
    if not graph.is_linear(node):
        return "only y = x Wᵀ layouts (nn.Linear, F.linear, aten.linear; ONNX Gemm / MatMul with a constant weight) take GPTQ"
    if spec.scheme == "uniform" and spec.granularity != "tensor" and spec.axis % 2 != 0:
        return f"spec {spec} does not quantize rows (axis 0)"
    return ""


def _by_input(graph, todo):
    """Nodes grouped by the producer of their input (q/k/v share one Hessian), in graph order."""
    groups: dict[object, list] = {}
    for node, spec in todo:
        groups.setdefault(graph.inputs(node)[0], []).append((node, spec))
    return list(groups.values())


def _stack(data: list[tuple], graph) -> tuple | None:
    """All batches as one batch (concatenated along dim 0), or None when they cannot be."""
    if len(data) == 1:
        return data[0]
    dynamic = graph.dynamic_dims()
    out = []
    for j, first in enumerate(data[0]):
        items = [b[j] for b in data]
        if not isinstance(first, torch.Tensor):
            if any(x != first for x in items):
                return None
            out.append(first)
            continue
        if first.dim() == 0 or (dynamic is not None and j < len(dynamic) and 0 not in dynamic[j]):
            return None
        if any(not isinstance(x, torch.Tensor) or x.shape[1:] != first.shape[1:] or x.dtype != first.dtype
               for x in items):
            return None
        out.append(torch.cat(items, dim=0))
    return tuple(out)


def _layer_row(graph, node, res: GPTQResult, w: torch.Tensor) -> dict:
    w = w.detach()
    rel = float((res.w_hat.reshape(w.shape) - w).norm() / w.norm().clamp_min(1e-30))
    return {"node": graph.qualname(node), "op": graph.op_type(node),
            "spec": str(graph.meta(node)[ANNOTATION_KEY].weight), "method": "gptq", "rel_weight_err": rel,
            "output_err": res.error, "rel_output_err": res.rel_error, "damp": res.damp,
            "fp32_bytes": w.numel() * 4, "bytes": int(res.qweight.nbytes)}
