"""qgraph: a post-training quantization compiler.

Trace a model into the IR, run a pass pipeline (canonicalize, annotate, calibrate, optimize
weights, fake-quant, lower) driven by a declarative target, and export or run the result.
"""
from qgraph.api import QuantizedModel, quantize
from qgraph.context import PassContext
from qgraph.errors import (
    ArtifactError,
    CalibrationError,
    ExportError,
    KernelError,
    OptionError,
    PassError,
    PassOrderError,
    PipelineError,
    QGraphError,
    SpecError,
    TargetError,
    TraceError,
)
from qgraph.instruments import DumpIRInstrument, PassInstrument, TimingInstrument, VerifyInstrument
from qgraph.ir import FxGraph, GraphView, trace
from qgraph.pass_base import Pass, PassResult
from qgraph.pass_manager import PassManager
from qgraph.pipeline import format_pipeline, parse_pipeline
from qgraph.registry import register_analysis, register_pass, registered_passes
from qgraph.target import Target, list_targets, load_target
from qgraph.version import __version__ as __version__

__all__ = [
    "ArtifactError",
    "CalibrationError",
    "DumpIRInstrument",
    "ExportError",
    "FxGraph",
    "GraphView",
    "KernelError",
    "OptionError",
    "Pass",
    "PassContext",
    "PassError",
    "PassInstrument",
    "PassManager",
    "PassOrderError",
    "PassResult",
    "PipelineError",
    "QGraphError",
    "QuantizedModel",
    "SpecError",
    "Target",
    "TargetError",
    "TimingInstrument",
    "TraceError",
    "VerifyInstrument",
    "format_pipeline",
    "list_targets",
    "load_target",
    "parse_pipeline",
    "quantize",
    "register_analysis",
    "register_pass",
    "registered_passes",
    "trace",
]


def __getattr__(name: str):
    """``qgraph.export_onnx`` is imported on first use (it pulls in the ONNX exporter stack)."""
    if name == "export_onnx":
        from qgraph.export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'qgraph' has no attribute {name!r}")
