"""Typed errors. Every message says what went wrong and what to do about it."""
from __future__ import annotations


class QGraphError(Exception):
    """Base class of every error qgraph raises on purpose."""


class TraceError(QGraphError):
    """A model could not be captured into the IR."""


class PipelineError(QGraphError):
    """A pass pipeline is malformed: unknown pass or option, bad option value, ordering violated."""


class PassOrderError(PipelineError):
    """Pass ordering constraints are cyclic or violated by the requested order."""


class TargetError(QGraphError):
    """A target spec is malformed, or cannot express what was asked of it."""


class SpecError(QGraphError):
    """A quantization spec (QSpec) that cannot exist, or does not fit the tensor it is applied to."""


class CalibrationError(QGraphError):
    """Calibration data does not fit the model, or calibration could not run."""


class KernelError(QGraphError):
    """A kernel was called with inputs it cannot take (dtype, device, shape, layout)."""


class ExportError(QGraphError):
    """An export (ONNX, artifact) failed or a file to import is corrupt."""


class ModelLoadError(QGraphError):
    """A bundled or user model could not be found or loaded."""
