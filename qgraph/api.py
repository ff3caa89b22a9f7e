"""The public entry point: `qgraph.quantize`."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from qgraph.context import PassContext
from qgraph.ir.trace import trace
from qgraph.pass_manager import PassManager
from qgraph.target import Target, load_target

CANONICALIZE = "fold-bn,dce,fuse-activation"
DEFAULT_PIPELINE = f"{CANONICALIZE},annotate,calibrate,quantize-weights,insert-fq"
LOWERING_PASSES = ("lower-bcq", "lower-embedding", "lower-int8", "lower-weight-only")


def lowering_pipeline(annotate_options: str = "", *, fallback: bool = False, verify_tol: float | None = None) -> str:
    """The full pipeline that lowers to real kernels: canonicalize, annotate, check-target, calibrate,
    quantize-weights, insert-fq, every registered lower-* pass, dce, verify."""
    from qgraph.registry import registered_passes

    lowerings = [p for p in LOWERING_PASSES if p in registered_passes()]
    if verify_tol is not None:  # lower-bcq picks its kernel mode from the tolerance verify will hold it to
        lowerings = [f"lower-bcq{{tol={verify_tol!r}}}" if p == "lower-bcq" else p for p in lowerings]
    annotate = f"annotate{{{annotate_options}}}" if annotate_options else "annotate"
    check = "check-target{fallback=true}" if fallback else "check-target"
    verify = f"verify{{tol={verify_tol!r}}}" if verify_tol is not None else "verify"
    return ",".join([CANONICALIZE, annotate, check, "calibrate", "quantize-weights", "insert-fq", *lowerings,
                     "dce", verify])


class QuantizedModel(nn.Module):
    """A quantized model: callable like the original, with its graph, target, pipeline and report."""

    def __init__(self, graph: Any, target: Target, pipeline: str, report: dict[str, Any],
                 artifacts: dict[str, Any] | None = None):
        super().__init__()
        self.graph = graph
        self.gm = getattr(graph, "gm", None)
        self.target = target
        self.pipeline = pipeline
        self.report = report
        self.artifacts = artifacts or {}
        # The compiled callable (qgraph.execution.CompiledCall) sits beside ``gm``, not inside it: not a
        # submodule, so state_dict, save_artifact (which exports ``gm``) and export never see compiled code.
        self._compiled = None

    @property
    def compiled(self) -> bool:
        """Whether calls run the ``torch.compile``d lowered graph."""
        return self._compiled is not None and self._compiled.compiled is not None

    def forward(self, *args: Any) -> Any:
        if self._compiled is not None:
            return self._compiled(*args)
        return self.gm(*args) if self.gm is not None else self.graph(*args)

    def eager(self, *args: Any) -> Any:
        """Run the lowered graph node by node (the reference the compiled code must match)."""
        return self.gm(*args) if self.gm is not None else self.graph(*args)

    def compile_execution(self, mode: bool | str = "on", example_inputs: tuple | None = None, *,
                          measure: bool = True, backend: Any = "inductor") -> dict[str, Any]:
        """Compile the lowered graph with ``torch.compile`` (``mode``: True/"on", False/"off", or "auto" =
        keep it only when it is faster than eager on ``example_inputs``, default: the graph's own).
        Returns ``report["compile"]``. Compiled calls run under ``torch.no_grad()``."""
        from qgraph.execution import compile_lowered

        if example_inputs is None:
            example_inputs = tuple(getattr(self.graph, "example_inputs", ()) or ())
        if self.gm is None:
            from qgraph.execution import normalize_mode

            info = {"requested": normalize_mode(mode), "used": "eager", "seconds": None, "eager_ms": None,
                    "compiled_ms": None, "error": None, "note": "only lowered torch graphs compile (this graph "
                                                                  "runs in onnxruntime)"}
        else:
            self._compiled, info = compile_lowered(self.gm, tuple(example_inputs), mode, measure=measure,
                                                   backend=backend)
        self.report["compile"] = info
        return info

    def __str__(self) -> str:
        return str(self.graph)


def quantize(
    model: nn.Module | str | Any,
    example_inputs: tuple | torch.Tensor | None = None,
    *,
    target: str | Target = "x86-avx2",
    calib: Iterable[Any] | None = None,
    pipeline: str | Sequence[Any] | None = None,
    strategy: dict[str, Any] | None = None,
    progress: bool = True,
    frontend: str = "auto",
    dynamic_shapes: Any = None,
    instruments: Sequence[Any] = (),
    compile: bool | str = False,
) -> QuantizedModel:
    """Trace ``model``, run the quantization pipeline for ``target`` and return the quantized model.

    ``model`` is an ``nn.Module``, or an ONNX model (a ``.onnx`` path or an `OnnxGraph`), which then runs
    through the same passes with onnxruntime executing calibration and the result.

    ``calib``: calibration batches (tensors, tuples, or dicts by input name); ``pipeline``: pass
    pipeline text (default: canonicalize, annotate, calibrate, quantize-weights, insert-fq);
    ``strategy``: per-node annotations (qualname → Annotation) that override the defaults;
    ``dynamic_shapes``: torch.export dynamic shapes (default: dynamic batch only);
    ``compile``: run the result through ``torch.compile`` (True / "on"), not (False / "off", the default), or
    "auto": compile, time eager against compiled once on the example inputs and keep the faster. What was
    chosen, both latencies and the compile seconds are in ``report["compile"]``; a compile failure falls back
    to eager with one warning. Compiled code never enters an artifact (see `QuantizedModel.compile_execution`).
    """
    from qgraph.execution import normalize_mode

    compile_mode = normalize_mode(compile)  # a bad value fails before any work
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    tgt = load_target(target) if not isinstance(target, Target) else target
    text = pipeline if pipeline is not None else DEFAULT_PIPELINE
    pm = PassManager(text if isinstance(text, str) else list(text))  # a bad pipeline fails before tracing
    graph = _graph_of(model, example_inputs, calib, frontend, dynamic_shapes)
    example_inputs = graph.example_inputs
    ctx = PassContext(target=tgt, config={"progress": progress, "strategy": strategy or {},
                                          "calibrate_on_example_inputs": calib is None},
                      calibration=calib, instruments=list(instruments))
    result = pm.run(graph, ctx)
    if isinstance(model, nn.Module):
        from qgraph.fingerprint import model_fingerprint

        ctx.artifacts["model_fingerprint"] = model_fingerprint(model)
    ctx.report["pipeline"] = str(pm)
    ctx.report["stats"] = result.stats
    q = QuantizedModel(result.graph, tgt, str(pm), ctx.report, ctx.artifacts)
    if compile_mode != "off":
        q.compile_execution(compile_mode, example_inputs)
    return q


def _graph_of(model: Any, example_inputs: tuple | None, calib: Iterable[Any] | None, frontend: str,
              dynamic_shapes: Any) -> Any:
    """The IR graph of ``model``: traced torch module, or an ONNX model read through onnx_ir."""
    from pathlib import Path

    from qgraph.errors import TraceError
    from qgraph.ir.inputs import as_tuple, input_names
    from qgraph.ir.onnx import OnnxGraph, example_inputs_for, load_onnx

    if isinstance(model, (str, Path, OnnxGraph)):
        graph = model if isinstance(model, OnnxGraph) else load_onnx(model)
        if example_inputs is not None:
            graph.example_inputs = tuple(example_inputs)
        elif calib is not None:
            first = next(iter(calib), None)
            graph.example_inputs = as_tuple(first, input_names(graph)) if first is not None else ()
        if not graph.example_inputs:
            graph.example_inputs = example_inputs_for(graph)
        return graph
    if example_inputs is None:
        raise TraceError("qgraph.quantize needs example_inputs to trace a torch module")
    return trace(model, tuple(example_inputs), frontend=frontend, dynamic_shapes=dynamic_shapes)
