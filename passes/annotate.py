"""annotate: attach a QSpec annotation to every quantizable node, from the target and the options.

Per node, in order of precedence: a per-node strategy entry (``ctx.config["strategy"]``: qualname or
node name → `Annotation`), the skip list (stays float), the options, the target's defaults.
Weighted ops (Gemm, MatMul with a constant weight, Conv) get a weight spec and, unless the scheme is
weight-only, an input-activation spec; embeddings (Gather) get a weight-only spec.
``act_dynamic=token|tensor`` makes that activation spec dynamic (symmetric scales computed per token / per
tensor at run time, no calibration); ``off`` makes a target's dynamic default static; ``act_symmetric``
overrides the activation spec's symmetry (dynamic specs default to symmetric). Conv inputs have no
tokens: a per-token request gives them per-tensor dynamic scales (noted in the report).
``residual_outputs`` also quantizes (with the static activation spec) the output of each conv that feeds an
``Add``, the last conv of a residual block: a QDQ runtime (onnxruntime) then runs that conv as an int8 kernel
too, instead of leaving it float with Q/DQ and layout changes around it (a Gemm / MatMul needs no such output:
onnxruntime's int8 matmuls return float). Those outputs are calibrated by
``residual_observer`` (default ``mse``: MobileNetV2's top-1 agreement 0.958 in torch, 0.969 in onnxruntime, against
0.948 / 0.906 with percentile ranges), unless calibrate's ``method`` names one observer for all.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from qgraph.errors import PipelineError, SpecError
from qgraph.ir.meta import ANNOTATION_KEY
from qgraph.pass_base import (
    POSITIVE_INT,
    Pass,
    PassResult,
    Rule,
    each,
    in_range,
    option_error,
    optional,
    validate,
)
from qgraph.passes.calibrate import OBSERVER
from qgraph.quant.qspec import Annotation, QSpec
from qgraph.registry import register_pass
from qgraph.target import load_target

LAYER_OPS = ("Gemm", "MatMul", "Conv")
ACT_BITS = Rule(lambda b: b == 0 or 2 <= b <= 8, "0 (float activations) or in [2, 8]")


def _is_regex(text: str) -> bool:
    try:
        re.compile(text)
    except re.error:
        return False
    return True


REGEX = Rule(_is_regex, "a regular expression")


@register_pass("annotate", ensures=("annotated",))
class Annotate(Pass):
    """Decide each quantizable node's weight/activation QSpecs."""

    @dataclass(frozen=True)
    class Options:
        scheme: Literal["uniform", "bcq"] | None = None
        bits: int | None = None
        granularity: Literal["tensor", "channel", "group"] | None = None
        group_size: int | None = None
        method: Literal["greedy", "alternating", "weighted"] = "weighted"
        offset: bool = False
        act_bits: int | None = None
        act_observer: str | None = None
        act_dynamic: Literal["off", "token", "tensor"] | None = None
        act_symmetric: bool | None = None
        embeddings: bool = True
        embedding_bits: int | None = None
        skip: tuple[str, ...] = ()
        residual_outputs: bool = False
        residual_observer: str = "mse"

        def __post_init__(self):
            bits = in_range(2, 8) if self.scheme == "uniform" else in_range(1, 8)
            validate(self, bits=optional(bits), group_size=optional(POSITIVE_INT), act_bits=optional(ACT_BITS),
                     act_observer=optional(OBSERVER), residual_observer=OBSERVER,
                     embedding_bits=optional(in_range(1, 8)), skip=each(REGEX))
            if self.granularity == "group" and self.group_size is None:
                raise option_error("group_size", "set with granularity=group", self.group_size)

    def run(self, graph, ctx) -> PassResult:
        target = ctx.target if ctx.target is not None else load_target("generic")
        if isinstance(target, str):
            target = ctx.target = load_target(target)
        o = self.options
        weight_spec = self._weight_spec(target)
        act_spec = self._activation_spec(target, weight_spec)
        strategy = ctx.config.get("strategy") or {}
        skip = [re.compile(p) for p in o.skip]
        notes: list[str] = []
        annotated = residual_outputs = 0
        for node in graph.nodes():
            op = graph.op_type(node)
            if op not in LAYER_OPS and op != "Gather":
                continue
            w = graph.param(node, "weight")
            if w is None or not w.is_floating_point():
                continue
            key = graph.qualname(node)
            if key in strategy or graph.name(node) in strategy:
                ann = strategy.get(key, strategy.get(graph.name(node)))
                ann = ann if isinstance(ann, Annotation) else Annotation.from_dict(ann)
            elif any(p.fullmatch(key) or p.fullmatch(graph.name(node)) for p in skip):
                ann = Annotation(fallback_float=True)
            elif op == "Gather":
                if not o.embeddings:
                    continue
                spec = target.defaults.embedding or QSpec.uniform(8, granularity="channel")
                if o.embedding_bits is not None:
                    spec = spec.replace(bits=o.embedding_bits)
                ann = Annotation(weight=spec)
            else:
                spec = _fit_to_weight(weight_spec, tuple(w.shape), key, notes)
                a_spec = act_spec
                if op == "Conv" and a_spec is not None and a_spec.granularity == "token":
                    a_spec = a_spec.replace(granularity="tensor")
                    notes.append(f"{key}: a conv input has no tokens; per-tensor dynamic activation scales")
                out = None
                if o.residual_outputs and op == "Conv" and a_spec is not None and not a_spec.dynamic and any(
                        graph.op_type(u) == "Add" for u in graph.users(node)):
                    out = a_spec.replace(observer=o.residual_observer)
                residual_outputs += out is not None
                ann = Annotation(weight=spec, inputs={0: a_spec} if a_spec is not None else {}, output=out)
            if op == "Conv" and any(s.granularity == "token" for s in ann.inputs.values()):
                raise SpecError(f"annotate: conv {key} has a per-token activation spec; conv inputs have no "
                                f"tokens: use per-tensor (e.g. 'int8/tensor/sym/dynamic')")
            graph.meta(node)[ANNOTATION_KEY] = ann
            annotated += 1
        ctx.report.setdefault("annotate", {})["notes"] = notes
        return PassResult(graph, modified=annotated > 0, preserved=frozenset({"*"}),
                          stats={"annotated": annotated, "residual_outputs": residual_outputs,
                                 "weight": str(weight_spec),
                                 "activation": str(act_spec) if act_spec else "float"})

    def _weight_spec(self, target) -> QSpec:
        o = self.options
        try:
            if o.scheme == "bcq":
                spec = QSpec.bcq(o.bits or 3, group_size=o.group_size, method=o.method, bcq_offset=o.offset)
                if o.granularity == "channel":
                    spec = spec.replace(granularity="channel", group_size=None)
                return spec
            spec = target.defaults.weight
            changes = {}
            if o.bits is not None:
                changes["bits"] = o.bits
            if o.granularity is not None:
                changes["granularity"] = o.granularity
                changes["group_size"] = o.group_size if o.granularity == "group" else None
            elif o.group_size is not None:
                changes.update(granularity="group", group_size=o.group_size)
            return spec.replace(**changes) if changes else spec
        except SpecError as e:
            raise PipelineError(f"pass 'annotate': options describe no valid weight quantization: {e}") from None

    def _activation_spec(self, target, weight_spec: QSpec) -> QSpec | None:
        o = self.options
        if o.act_bits == 0 or weight_spec.scheme == "bcq" and not o.act_bits:
            return None
        base = target.defaults.activation
        if o.act_bits is None:
            # Only quantize activations when the target has a kernel taking them with these weights.
            if base is None or target.kernel_for("Gemm", weight_spec, base) in (None, "float") or \
                    target.kernel_for("Gemm", weight_spec, base).endswith("weight_only"):
                return None
            spec = base
        else:
            spec = (base or QSpec.uniform(8)).replace(bits=o.act_bits)
        if o.act_observer is not None:
            try:
                spec = spec.replace(observer=o.act_observer)
            except SpecError as e:
                raise PipelineError(f"pass 'annotate' option 'act_observer': {e}") from None
        if o.act_dynamic == "off" and spec.dynamic:
            spec = spec.replace(dynamic=False, granularity="tensor")
        elif o.act_dynamic in ("token", "tensor"):
            spec = spec.replace(dynamic=True, granularity=o.act_dynamic, symmetric=True, signed=True,
                                pow2_scale=False)
        if o.act_symmetric is not None:
            spec = spec.replace(symmetric=o.act_symmetric)
        return spec


def _fit_to_weight(spec: QSpec, shape: tuple[int, ...], name: str, notes: list[str]) -> QSpec:
    """A group spec whose group size does not divide this weight's rows falls back to per-channel."""
    try:
        spec.check_tensor(shape)
        return spec
    except SpecError:
        if spec.granularity != "group":
            raise
        notes.append(f"{name}: group_size {spec.group_size} does not divide rows of {list(shape)}; per-channel")
        return spec.replace(granularity="channel", group_size=None)
