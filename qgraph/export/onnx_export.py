"""`export_onnx`: write a quantized model as ONNX that onnxruntime runs.

Pipeline: `prepare` (marker ops in a copy of the graph) → ``torch.export`` → ``torch.onnx.export(dynamo=True)``
with the markers translated to placeholders → `rewrite` (onnx_ir) to Q/DQ, BiQGEMM and gather forms →
``onnx.checker`` → save (external data for large models).
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch

from qgraph.errors import ExportError
from qgraph.export import markers, schema
from qgraph.export.prepare import prepare
from qgraph.export.rewrite import rewrite
from qgraph.program import program_dynamic_shapes

DEFAULT_OPSET = 21
MIN_OPSET = 18
MAX_OPSET = 23
#: Above this many bytes of initializers, weights go to an external data file (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass(frozen=True)
class ExportInfo:
    """What `export_onnx` wrote."""

    path: Path
    data_path: Path | None
    opset: int
    custom_ops: bool
    portable: bool
    bytes: int
    counts: dict[str, int] = field(default_factory=dict)
    notes: tuple[dict, ...] = ()

    @property
    def needs_custom_ops(self) -> bool:
        """Whether `qgraph.export.session_options` must be passed to onnxruntime to run this file."""
        return self.custom_ops


@dataclass
class PreparedONNX:
    """A quantized model captured as ONNX with qgraph placeholders (the expensive torch part of an export);
    `write` turns a copy into a file, so one capture can be written in several forms."""

    model: ir.Model
    opset: int
    notes: tuple[dict, ...]
    counts: dict[str, int]
    metadata: dict[str, str]

    def write(self, path: str | os.PathLike, *, portable: bool = False, mu: int = 8, quantized_residuals: bool = False,
              external_data: bool | None = None) -> ExportInfo:
        """Rewrite the placeholders (QDQ, BiQGEMM or its portable form, gathers), save and check the file."""
        if mu not in (4, 8):
            raise ExportError(f"mu (bits per portable LUT key) must be 4 or 8, got {mu}")
        path = Path(path)
        if not path.parent.exists():
            raise ExportError(f"directory {path.parent} does not exist; create it first")
        model = self.model.clone()
        stats = rewrite(model, portable=portable, mu=mu, quantized_residuals=quantized_residuals)
        model.producer_name = "qgraph"
        model.producer_version = _version()
        model.metadata_props.update({**self.metadata, "qgraph.portable": str(bool(portable)).lower()})
        data_path = _save(model, path, external_data)
        _check(path)
        counts = {**self.counts, **{f"onnx:{k}": v for k, v in stats.counts.items()}}
        size = path.stat().st_size + (data_path.stat().st_size if data_path else 0)
        return ExportInfo(path, data_path, self.opset, stats.custom_domain, portable, size, counts, self.notes)


def prepare_onnx(
    qmodel: Any,
    example_inputs: tuple | torch.Tensor,
    *,
    opset: int | None = None,
    dynamic_shapes: Any = None,
) -> PreparedONNX:
    """Capture ``qmodel`` with ``torch.export`` and the torch ONNX exporter (see `export_onnx` for the options)."""
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset must be in {MIN_OPSET}..{MAX_OPSET} (the torch exporter starts at 18), got {opset}")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise ExportError("example_inputs must be a tensor or a tuple of tensors (the model's positional inputs)")
    schema.register()
    prepared = prepare(qmodel)
    if dynamic_shapes is None:
        dynamic_shapes = program_dynamic_shapes(getattr(qmodel, "graph", qmodel), args)
    model = _torch_export(prepared.module, args, dynamic_shapes, opset)
    meta = {}
    for key, attr in (("qgraph.pipeline", "pipeline"), ("qgraph.target", "target")):
        val = getattr(qmodel, attr, None)
        if val is not None:
            meta[key] = str(getattr(val, "name", val))
    return PreparedONNX(model, opset, tuple(prepared.notes), dict(prepared.counts), meta)


def export_onnx(
    qmodel: Any,
    path: str | os.PathLike,
    example_inputs: tuple | torch.Tensor,
    *,
    portable: bool = False,
    opset: int | None = None,
    external_data: bool | None = None,
    dynamic_shapes: Any = None,
    mu: int = 8,
    quantized_residuals: bool = False,
) -> ExportInfo:
    """Export ``qmodel`` (a `qgraph.QuantizedModel`) to ``path``.

    Uniform layers become QDQ (int8 / int4 weight initializers + DequantizeLinear, activations
    QuantizeLinear → DequantizeLinear with the calibrated qparams); BCQ layers become ``ai.qgraph::BiQGEMM``
    (run it with ``onnxruntime.InferenceSession(path, qgraph.export.session_options())``), or with
    ``portable=True`` standard ops any onnxruntime runs (``mu`` = 4 or 8 bits per LUT key, see
    `qgraph.export.portable`). Row-wise quantized embeddings become a Gather of integer rows.

    ``opset``: default 21 (int4 and blocked DequantizeLinear); 18..20 store ≤4-bit weights as int8 and reject
    group-wise uniform weights. ``external_data``: None writes weights to ``<path>.data`` when they exceed
    ~1.8 GB, True always, False never (then > 2 GB fails). ``dynamic_shapes`` (torch.export form) defaults to
    ``Dim.AUTO`` on the batch dimension and on every dimension that was dynamic when the model was traced (e.g.
    MiniLM's sequence length with ``qgraph.models.minilm.dynamic_shapes()``); a dim of size 1 in the example
    stays static, so give examples with batch ≥ 2. Exporting one model in several forms: call
    `prepare_onnx` once and `PreparedONNX.write` per form. ``quantized_residuals=True``: a residual ``Add``
    that reads a Conv / Gemm / MatMul output which is also fake-quantized reads its Q/DQ'd value instead of the
    float one, so onnxruntime can run that op as an int8 kernel (``QLinearConv``); the Add's input then moves
    by up to half a quantization step from what the simulation computes.
    """
    prepared = prepare_onnx(qmodel, example_inputs, opset=opset, dynamic_shapes=dynamic_shapes)
    return prepared.write(path, portable=portable, mu=mu, external_data=external_data,
                          quantized_residuals=quantized_residuals)


def _version() -> str:
    from qgraph.version import __version__

    return __version__


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if "Exception summary" in line:
            break
    lines = [ln for ln in text.splitlines() if ln.strip()]
    summary = [ln for ln in lines if ln.startswith("<class")]
    return (summary[-1] if summary else (lines[0] if lines else type(e).__name__))[:500]


def _torch_export(module: torch.nn.Module, args: tuple, dynamic_shapes: Any, opset: int):
    module.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # noqa: BLE001 - torch.export raises many types from user code
        raise ExportError(f"torch.export of the quantized model failed: {_first_line(e)}; check that the model "
                          f"runs on example_inputs (same count, dtypes and ranks as when it was quantized)") from None
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _fast_translate(ep, opset)
            if model is None:
                model = torch.onnx.export(ep, args, dynamo=True, optimize=False, verbose=False, opset_version=opset,
                                          custom_translation_table=markers.translation_table()).model
    except Exception as e:  # noqa: BLE001 - any exporter failure becomes one ExportError line
        raise ExportError(f"the torch ONNX exporter failed: {_first_line(e)}. An op without an ONNX translation "
                          f"must be rewritten or kept out of the model before export") from None
    _light_optimize(model)
    return model


@lru_cache(maxsize=1)
def _registry():
    from torch.onnx._internal.exporter import _registration

    registry = _registration.ONNXRegistry.from_torchlib()
    for op, fn in markers.translation_table().items():
        registry.register_op(op, fn, is_complex=False)
    return registry


def _fast_translate(ep, opset: int) -> ir.Model | None:
    """``ExportedProgram`` → ONNX IR with a registry built once per process (``torch.onnx.export`` rebuilds
    it from torchlib on every call, seconds each); None when this torch lacks the internal entry point."""
    try:
        from torch.onnx._internal.exporter import _constants, _core
    except ImportError:
        return None
    if not hasattr(_core, "exported_program_to_ir") or opset < _constants.TORCHLIB_OPSET:
        return None
    model = _core.exported_program_to_ir(ep, registry=_registry())
    if model.opset_imports.get("") != opset:
        from onnxscript import version_converter

        version_converter.convert_version(model, opset, fallback=True)
    return model


def _light_optimize(model: ir.Model) -> None:
    """Constant folding, dead code, constant lifting, dedup and CSE: what the exporter's own optimizer does
    minus its pattern rewriter, which costs seconds on a transformer and changes nothing qgraph relies on."""
    from onnx_ir.passes import common
    from onnxscript.optimizer import _constant_folding

    ir.passes.Sequential(
        common.InlinePass(),
        _constant_folding.FoldConstantsPass(shape_inference=True, input_size_limit=8192,
                                            output_size_limit=512 * 512),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.NameFixPass(),
    )(model)


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _save(model: ir.Model, path: Path, external_data: bool | None) -> Path | None:
    if external_data is None:
        external_data = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_path = path.with_name(path.name + ".data") if external_data else None
    if not external_data and _initializer_bytes(model) > 2**31 - 1:
        raise ExportError("the model's weights exceed protobuf's 2 GB limit; pass external_data=True")
    try:
        if data_path is not None:
            if data_path.exists():
                data_path.unlink()
            ir.save(model, path, external_data=data_path.name)
        else:
            ir.save(model, path)
    except OSError as e:
        raise ExportError(f"could not write {path}: {e}") from None
    return data_path


def _check(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported model fails onnx.checker: {str(e).splitlines()[0]}") from None


def load_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``qgraph.*`` metadata of an exported file (without loading its weights)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises protobuf/IO errors of many types
        raise ExportError(f"{path} is not a readable ONNX file: {e}") from None
    return {p.key: p.value for p in proto.metadata_props}
