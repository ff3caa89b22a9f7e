"""Running GPTQ-style layer-wise quantization over a `GraphView`: which layers take it, how calibration batches
are stacked, how layers sharing one input are grouped (one Hessian each), and the sequential run in which each
layer's Hessian comes from inputs produced by the already-quantized layers before it. Shared by the ``gptq`` and
``aespa`` passes (the per-layer math is `qgraph.quant.gptq` / `qgraph.quant.aespa`)."""
from __future__ import annotations

import torch

from qgraph.errors import CalibrationError, QGraphError
from qgraph.ir.meta import ANNOTATION_KEY, QWEIGHT_KEY
from qgraph.quant.gptq import GPTQResult, HessianAccumulator


class _Finished(Exception):
    """Raised from the last tap to stop the calibration run early."""


def select_layers(graph) -> tuple[list, list, list[str]]:
    """The annotated weights not yet quantized: ``(todo, rest, notes)``. ``todo``: ``(node, spec)`` of the Linears
    GPTQ takes; ``rest``: ``(node, spec)`` of the other weights (round-to-nearest), with a note each saying why."""
    todo, rest, notes = [], [], []
    for node in graph.nodes():
        meta = graph.meta(node)
        ann = meta.get(ANNOTATION_KEY)
        if ann is None or ann.weight is None or QWEIGHT_KEY in meta:
            continue
        spec = ann.weight
        why = not_gptq_able(graph, node, spec)
        if why:
            notes.append(f"{graph.qualname(node)}: {why}; round-to-nearest")
            rest.append((node, spec))
        else:
            todo.append((node, spec))
    return todo, rest, notes


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
            raise stacking_error(e, stacked, pass_name) from e
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
        raise stacking_error(e, stacked, pass_name) from e
    finally:
        with torch.no_grad():
            for p, w in saved_p.values():
                p.copy_(w)
    if done[0] != len(groups):
        raise CalibrationError(f"{pass_name}: the calibration run reached only {done[0]} of {len(groups)} "
                               f"layer inputs")
    return results


def stacking_error(e: Exception, stacked, pass_name: str) -> CalibrationError:
    rows = next((t.shape[0] for t in stacked if isinstance(t, torch.Tensor)), "?")
    return CalibrationError(f"{pass_name}: the calibration batches stacked into one batch of {rows} do not run "
                            f"through the graph ({type(e).__name__}: {e}); use {pass_name}{{sequential=false}} "
                            f"or fewer batches")


def not_gptq_able(graph, node, spec) -> str:
    """Why a node cannot take GPTQ ('' when it can)."""
    if graph.op_type(node) not in ("Gemm", "MatMul"):
        return f"{graph.op_type(node)} is not a Linear"
    if not graph.is_linear(node):
        return "only y = x Wᵀ layouts (nn.Linear, F.linear, aten.linear; ONNX Gemm / MatMul with a constant weight) take GPTQ"
    if spec.scheme == "uniform" and spec.granularity != "tensor" and spec.axis % 2 != 0:
        return f"spec {spec} does not quantize rows (axis 0)"
    return ""


def group_by_input(graph, todo):
    """Nodes grouped by the producer of their input (q/k/v share one Hessian), in graph order."""
    groups: dict[object, list] = {}
    for node, spec in todo:
        groups.setdefault(graph.inputs(node)[0], []).append((node, spec))
    return list(groups.values())


def stack_batches(data: list[tuple], graph) -> tuple | None:
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


def layer_row(graph, node, res: GPTQResult, w: torch.Tensor) -> dict:
    w = w.detach()
    rel = float((res.w_hat.reshape(w.shape) - w).norm() / w.norm().clamp_min(1e-30))
    return {"node": graph.qualname(node), "op": graph.op_type(node),
            "spec": str(graph.meta(node)[ANNOTATION_KEY].weight), "method": "gptq", "rel_weight_err": rel,
            "output_err": res.error, "rel_output_err": res.rel_error, "damp": res.damp,
            "fp32_bytes": w.numel() * 4, "bytes": int(res.qweight.nbytes)}
