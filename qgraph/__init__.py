"""qgraph: a post-training quantization compiler.

Trace a model into the IR, run a pass pipeline (canonicalize, annotate, calibrate, optimize
weights, fake-quant, lower) driven by a declarative target, and export or run the result.
"""
from qgraph.api import QuantizedModel, quantize
from qgraph.context import PassContext
from qgraph.errors import (
    CalibrationError,
    ExportError,
    KernelError,
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

__version__ = "0.1.0"

__all__ = [
    "CalibrationError", "DumpIRInstrument", "ExportError", "FxGraph", "GraphView", "KernelError", "Pass",
    "PassContext", "PassInstrument", "PassManager", "PassOrderError", "PassResult", "PipelineError",
    "QGraphError", "SpecError", "TargetError", "TimingInstrument", "TraceError", "VerifyInstrument",
    "format_pipeline", "parse_pipeline", "register_analysis", "register_pass", "registered_passes", "trace", "quantize", "QuantizedModel", "Target", "list_targets", "load_target",
]
