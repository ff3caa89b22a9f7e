"""Frontends: capture an `nn.Module` into an `FxGraph` with symbolic_trace or torch.export."""
from __future__ import annotations

import contextlib
import copy
import io
import traceback
from typing import Any, Literal

import torch
from torch import fx, nn

from qgraph.errors import TraceError
from qgraph.ir.fx import FxGraph

Frontend = Literal["auto", "fx", "export"]


def trace(
    model: nn.Module,
    example_inputs: tuple | torch.Tensor,
    *,
    frontend: Frontend = "auto",
    dynamic_batch: bool = True,
    name: str | None = None,
    copy_model: bool = True,
    dynamic_shapes: Any = None,
) -> FxGraph:
    """Capture ``model`` into the IR.

    ``frontend="fx"`` uses ``torch.fx.symbolic_trace`` (plain modules; layers stay ``call_module``);
    ``"export"`` uses ``torch.export`` (ATen graph; the path for Hugging Face models);
    ``"auto"`` tries fx, then export. With ``dynamic_batch`` the graph accepts other batch sizes than
    the example's (dim 0 of every tensor input). ``copy_model`` traces a deep copy, so passes
    never change the caller's module (symbolic_trace shares submodules with it). ``dynamic_shapes``
    (torch.export form) replaces the dynamic-batch default, e.g. to make sequence length dynamic too.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace() needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    name = name or type(model).__name__
    if copy_model:
        model = copy.deepcopy(model)
    if frontend not in ("auto", "fx", "export"):
        raise TraceError(f"unknown frontend {frontend!r}; use 'auto', 'fx' or 'export'")
    was_training = model.training
    model.eval()
    try:
        with _quiet_torch():
            return _capture(model, example_inputs, frontend, dynamic_batch, name, dynamic_shapes)
    finally:
        model.train(was_training)


def _capture(model: nn.Module, example_inputs: tuple, frontend: str, dynamic_batch: bool, name: str,
             dynamic_shapes: Any) -> FxGraph:
    if frontend == "fx":
        return _trace_fx(model, example_inputs, dynamic_batch, name)
    if frontend == "export" or dynamic_shapes is not None:
        return _trace_export(model, example_inputs, dynamic_batch, name, dynamic_shapes)
    try:
        return _trace_fx(model, example_inputs, dynamic_batch, name)
    except TraceError as fx_error:
        try:
            return _trace_export(model, example_inputs, dynamic_batch, name)
        except TraceError as export_error:
            raise TraceError(
                f"could not trace {name} with either frontend.\n  symbolic_trace: {fx_error}\n"
                f"  torch.export: {export_error}"
            ) from None


@contextlib.contextmanager
def _quiet_torch():
    """Failed captures make torch print tracebacks and fake-tensor logs; the TraceError says what matters."""
    import logging

    loggers = [logging.getLogger(n) for n in ("torch._subclasses.fake_tensor", "torch.export", "torch._dynamo",
                                               "torch.fx.experimental.symbolic_shapes", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _where(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "site-packages/torch" not in f.filename]
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _trace_fx(model: nn.Module, example_inputs: tuple, dynamic_batch: bool, name: str) -> FxGraph:
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, AttributeError... from user code
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "control flow" in msg or "iterate" in msg:
            hint = ("the model branches on tensor values; rewrite the branch with torch.where/torch.cond, "
                    "or use frontend='export'")
        else:
            hint = "try frontend='export'"
        raise TraceError(f"symbolic_trace failed: {msg}{_where(e)}; {hint}") from None
    graph = FxGraph(gm, frontend="fx", example_inputs=example_inputs, name=name)
    try:
        graph.propagate_shapes(*example_inputs)
    except Exception as e:
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        first = (str(root).strip().splitlines() or [type(root).__name__])[0]
        raise TraceError(f"the traced graph does not run on the example inputs: {type(root).__name__}: {first}"
                         f"{_where(root)}") from None
    if dynamic_batch:
        _check_other_batch(graph, example_inputs)
    return graph


def _batch_dims(example_inputs: tuple, batch: Any) -> tuple:
    return tuple({0: batch} if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in example_inputs)


def _trace_export(model: nn.Module, example_inputs: tuple, dynamic_batch: bool, name: str,
                  dynamic_shapes: Any = None) -> FxGraph:
    if dynamic_shapes is None and dynamic_batch and any(isinstance(t, torch.Tensor) and t.dim() > 0 for t in example_inputs):
        dynamic_shapes = _batch_dims(example_inputs, torch.export.Dim.AUTO)
    try:
        ep = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        text = str(e)
        if "data-dependent" in text or "Could not guard on data-dependent" in text or "GuardOnDataDependent" in text:
            hint = ("the model branches on tensor values; rewrite the branch with torch.where/torch.cond "
                    "so it can be captured")
        else:
            hint = "check that the model runs eagerly on the example inputs"
        raise TraceError(f"torch.export failed: {first}{_where(e)}; {hint}") from None
    gm = ep.module()
    graph = FxGraph(gm, frontend="export", example_inputs=example_inputs, name=name)
    if dynamic_batch:
        _check_other_batch(graph, example_inputs)
    return graph


def _check_other_batch(graph: FxGraph, example_inputs: tuple) -> None:
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not tensors:
        return
    batch = tensors[0].shape[0]
    if any(t.shape[0] != batch for t in tensors):
        return
    other = tuple(
        torch.cat([t, t[:1]], dim=0) if isinstance(t, torch.Tensor) and t.dim() > 0 else t
        for t in example_inputs
    )
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            graph(*other)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TraceError(
            f"the traced model only runs at batch size {batch} ({first}); it hard-codes the batch "
            f"dimension. Pass dynamic_batch=False to trace at a fixed batch size, or replace the literal "
            f"size with x.shape[0] in the model"
        ) from None
