"""Typed errors. Every message says what went wrong and what to do about it."""
from __future__ import annotations


class QGraphError(Exception):
    """Base class of every error qgraph raises on purpose."""


class TraceError(QGraphError):
    """A model could not be captured into the IR."""


class PipelineError(QGraphError):
    """A pass pipeline is malformed: unknown pass or option, bad option value, ordering violated."""


class OptionError(PipelineError, ValueError):
    """A pass option value outside its valid range (raised by an ``Options`` dataclass's ``__post_init__``)."""


class PassError(QGraphError):
    """A pass failed with an unexpected (non-qgraph) exception; names the pass, its options and what ran before.

    The original exception is chained as ``__cause__``; ``pass_name``, ``options`` (the pass's Options object)
    and ``after`` (the pass texts that ran before it in this pipeline run) say where it happened.
    """

    def __init__(self, pass_text: str, options: object, after: list[str], cause: BaseException):
        self.pass_name = pass_text.split("{", 1)[0]
        self.pass_text = pass_text
        self.options = options
        self.after = list(after)
        where = f"after {', '.join(after)}" if after else "first in the pipeline"
        detail = str(cause).strip().splitlines()
        msg = f"{type(cause).__name__}: {detail[0] if detail else ''}".rstrip(": ")
        super().__init__(f"pass '{pass_text}' ({where}): {msg}\n  options: {options!r}\n"
                         f"  this is a bug in the pass or an input it does not handle; the original error is chained "
                         f"(see the traceback above this one)")


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


class ArtifactError(ExportError):
    """A saved artifact is missing, corrupt, tampered with, or does not fit the model it is applied to."""
