"""`QSpec`: what quantization a tensor gets; `Annotation`: the QSpecs of one graph node.

A QSpec is frozen and checks itself on construction, so a spec that exists is a spec that makes sense.
Whether it fits a particular tensor (axis in range, group size divides the row) is `check_tensor`'s job.

Conventions shared with `uniform.py`, `bcq.py` and the observers:
- ``granularity="channel"``: one scale per index of dimension ``axis``.
- ``granularity="group"``: the tensor is viewed as ``[C, K]`` with ``C = shape[axis]`` and the remaining
  dimensions flattened in order (for a Linear weight ``[out, in]`` with axis 0: groups run along
  ``in_features``); each row is cut into ``K / group_size`` contiguous groups, one scale per group.
- BCQ specs quantize a weight viewed as ``[shape[0], -1]`` with α per row (``channel``) or per group.
- ``dynamic=True`` (activations only): the scale is computed from each tensor as it flows (no calibration);
  ``granularity="token"``: one scale per row of ``x`` viewed as ``[-1, shape[-1]]`` (per token), only
  meaningful for dynamic specs; ``"tensor"``: one scale per call.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from qgraph.errors import SpecError

Scheme = Literal["uniform", "bcq"]
Granularity = Literal["tensor", "channel", "group", "token"]
BCQMethod = Literal["greedy", "alternating", "weighted"]

SCHEMES: tuple[str, ...] = ("uniform", "bcq")
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group", "token")
BCQ_METHODS: tuple[str, ...] = ("greedy", "alternating", "weighted")
#: Names accepted in ``QSpec.observer``; `qgraph.quant.observers.OBSERVERS` holds one class per name.
OBSERVER_NAMES: tuple[str, ...] = ("minmax", "moving_average", "percentile", "mse", "entropy")

UNIFORM_BITS = range(2, 9)
BCQ_BITS = range(1, 9)


@dataclass(frozen=True)
class QSpec:
    """How one tensor is quantized.

    Uniform fields: ``bits`` 2..8, ``signed`` (int vs uint storage), ``symmetric`` (zero point 0) or
    affine, ``pow2_scale`` (scales rounded up to a power of two), ``observer`` (calibration method for
    activations). BCQ fields (``scheme="bcq"``, weights only): ``bits`` = number of binary planes q
    (1..8; search spaces use 1..4), ``bcq_method``, ``bcq_rounds`` (alternating rounds),
    ``importance_exp`` e of the weighted method's importance m = (|w| / max|w|)^e per row-group
    (e=0 is plain alternating BCQ; the default e=1 weighs an error by the magnitude of the weight it
    hits, the paper's "magnitude is importance" in its simplest form), ``importance_clip_quantile``
    (clamp m at this per-group quantile so a few huge weights cannot own the fit), and ``bcq_offset``
    (a per-group offset z: w ≈ z + Σ α_i b_i). ``scale_bits`` (uniform, unsigned asymmetric, per group only):
    block scales in the K-quant way, ``w = d·c − m`` with ``d, m ≥ 0`` per group stored as ``scale_bits``-bit
    codes of two fp16 scales per row (see `qgraph.quant.block_scaled`); None: fp32 scale + integer zero point.
    ``dynamic`` (uniform activations only): scales from each tensor at run time, per ``token`` or per
    ``tensor``; the observer is not used.
    """

    scheme: Scheme = "uniform"
    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: Granularity = "tensor"
    axis: int = 0
    group_size: int | None = None
    pow2_scale: bool = False
    observer: str = "minmax"
    bcq_method: BCQMethod = "weighted"
    bcq_rounds: int = 15
    importance_exp: float = 1.0
    importance_clip_quantile: float | None = None
    bcq_offset: bool = False
    dynamic: bool = False
    scale_bits: int | None = None

    def __post_init__(self) -> None:
        _check_type("bits", self.bits, int)
        _check_type("axis", self.axis, int)
        _check_type("bcq_rounds", self.bcq_rounds, int)
        for name in ("signed", "symmetric", "pow2_scale", "bcq_offset", "dynamic"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"QSpec.{name} must be a bool, got {getattr(self, name)!r}")
        if self.scheme not in SCHEMES:
            raise SpecError(f"QSpec.scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.granularity not in GRANULARITIES:
            raise SpecError(f"QSpec.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.observer not in OBSERVER_NAMES:
            raise SpecError(f"QSpec.observer must be one of {OBSERVER_NAMES}, got {self.observer!r}")
        if self.granularity == "group":
            if self.group_size is None or isinstance(self.group_size, bool) or not isinstance(
                self.group_size, int
            ) or self.group_size <= 0:
                raise SpecError(
                    f"granularity='group' needs group_size, a positive int (e.g. 128); got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise SpecError(
                f"group_size={self.group_size} only applies to granularity='group' "
                f"(this spec has granularity={self.granularity!r}); drop it or use granularity='group'"
            )
        if self.scheme == "uniform":
            self._check_uniform()
        else:
            self._check_bcq()
        self._check_dynamic()

    def _check_dynamic(self) -> None:
        if not self.dynamic:
            if self.granularity == "token":
                raise SpecError("granularity='token' (a scale per row) needs dynamic=True: per-token scales are "
                                "computed at run time; use 'intN/token/sym/dynamic' or a static per-tensor spec")
            return
        if self.scheme != "uniform":
            raise SpecError("dynamic quantization is uniform (scales computed at run time); bcq is weight-only")
        if self.granularity not in ("tensor", "token"):
            raise SpecError(f"a dynamic activation spec is per 'token' or per 'tensor', got "
                            f"granularity={self.granularity!r}")
        if self.pow2_scale:
            raise SpecError("dynamic specs compute free float scales at run time: drop pow2_scale")

    def _check_uniform(self) -> None:
        if self.bits not in UNIFORM_BITS:
            raise SpecError(f"uniform QSpec.bits must be in 2..8, got {self.bits}")
        if self.bcq_offset:
            raise SpecError("bcq_offset only applies to scheme='bcq'; a uniform spec uses symmetric=False")
        sb = self.scale_bits
        if sb is not None:
            if isinstance(sb, bool) or not isinstance(sb, int) or not 2 <= sb <= 8:
                raise SpecError(f"QSpec.scale_bits must be None or an int in 2..8, got {sb!r}")
            if self.granularity != "group" or self.symmetric or self.signed or self.axis != 0 or self.dynamic:
                raise SpecError("scale_bits (block scales w = d·c − m) needs an unsigned asymmetric per-group weight "
                                "spec along axis 0, e.g. 'uint4/g32/asym/sb=6'")
        default = QSpec.__dataclass_fields__
        for name in ("bcq_method", "bcq_rounds", "importance_exp", "importance_clip_quantile"):
            if getattr(self, name) != default[name].default:
                raise SpecError(f"{name} only applies to scheme='bcq'; leave it at its default for a uniform spec")

    def _check_bcq(self) -> None:
        if self.bits not in BCQ_BITS:
            raise SpecError(f"bcq QSpec.bits (number of binary planes) must be in 1..8, got {self.bits}")
        if not (self.symmetric and self.signed):
            raise SpecError(
                "bcq has no integer zero point, so it must be signed=True, symmetric=True; "
                "use bcq_offset=True for an offset"
            )
        if self.pow2_scale:
            raise SpecError("pow2_scale applies to uniform specs only; bcq scales (alpha) are free floats")
        if self.scale_bits is not None:
            raise SpecError("scale_bits applies to uniform specs only; bcq scales (alpha) are free floats")
        if self.granularity == "tensor":
            raise SpecError(
                "bcq scales (alpha) are per row or per row-group: use granularity='channel' (per row) "
                "or granularity='group' with a group_size"
            )
        if self.axis != 0:
            raise SpecError(f"bcq quantizes rows of a weight viewed as [out, -1]: axis must be 0, got {self.axis}")
        if self.bcq_method not in BCQ_METHODS:
            raise SpecError(f"QSpec.bcq_method must be one of {BCQ_METHODS}, got {self.bcq_method!r}")
        if self.bcq_rounds < 0:
            raise SpecError(f"QSpec.bcq_rounds must be >= 0, got {self.bcq_rounds}")
        e = self.importance_exp
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e < 0:
            raise SpecError(f"QSpec.importance_exp must be a finite float >= 0 (0 = unweighted), got {e!r}")
        c = self.importance_clip_quantile
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 < c <= 1.0):
            raise SpecError(f"QSpec.importance_clip_quantile must be None or in (0, 1], got {c!r}")

    # --- convenience constructors ---------------------------------------------------------------
    @classmethod
    def uniform(cls, bits: int = 8, **kw: Any) -> QSpec:
        """A uniform spec, e.g. ``QSpec.uniform(4, granularity="group", group_size=128)``."""
        return cls(scheme="uniform", bits=bits, **kw)

    @classmethod
    def bcq(cls, bits: int = 3, group_size: int | None = None, method: BCQMethod = "weighted", **kw: Any) -> QSpec:
        """A BCQ weight spec: per row when ``group_size`` is None, else per group of ``group_size`` columns."""
        gran = "channel" if group_size is None else "group"
        return cls(scheme="bcq", bits=bits, granularity=gran, group_size=group_size, bcq_method=method, **kw)

    # --- derived facts --------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        """Smallest integer code (uniform)."""
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest integer code (uniform)."""
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def check_tensor(self, shape: tuple[int, ...] | list[int]) -> None:
        """Raise SpecError unless this spec can be applied to a tensor of ``shape``."""
        shape = tuple(int(s) for s in shape)
        nd = len(shape)
        if self.scheme == "bcq" and nd < 2:
            raise SpecError(f"bcq quantizes a matrix (viewed as [out, -1]); got a {nd}-d tensor of shape {shape}")
        if self.granularity in ("channel", "group"):
            if nd == 0:
                raise SpecError(f"granularity={self.granularity!r} needs a tensor with dimensions, got a scalar")
            if not -nd <= self.axis < nd:
                raise SpecError(f"axis={self.axis} is out of range for a {nd}-d tensor of shape {shape}")
        if self.granularity == "group":
            ax = self.axis % nd
            k = math.prod(shape) // shape[ax] if shape[ax] else 0
            if k % self.group_size:
                raise SpecError(
                    f"group_size={self.group_size} does not divide the row length {k} of a tensor of shape "
                    f"{shape} (rows along axis {self.axis}); pick a divisor of {k} or granularity='channel'"
                )

    # --- text and dict forms --------------------------------------------------------------------
    def __str__(self) -> str:
        if self.granularity == "group":
            gran = f"g{self.group_size}"
        else:
            gran = self.granularity
        if self.scheme == "bcq":
            parts = [f"bcq{self.bits}", gran, self.bcq_method]
            if self.bcq_offset:
                parts.append("offset")
        else:
            parts = [f"{'int' if self.signed else 'uint'}{self.bits}", gran, "sym" if self.symmetric else "asym"]
            if self.pow2_scale:
                parts.append("pow2")
            if self.dynamic:
                parts.append("dynamic")
        default = QSpec()
        for name, key in _EXTRA_KEYS.items():
            v = getattr(self, name)
            if v != getattr(default, name):
                parts.append(f"{key}={v}")
        return "/".join(parts)

    @classmethod
    def parse(cls, text: str) -> QSpec:
        """Inverse of ``str()``: ``"int8/channel/sym"``, ``"uint8/tensor/asym/obs=percentile"``,
        ``"bcq3/g128/weighted/offset/e=2.0"``, ``"int8/token/sym/dynamic"``."""
        parts = [p.strip() for p in text.strip().split("/")]
        if len(parts) < 3:
            raise SpecError(f"cannot parse QSpec {text!r}: expected e.g. 'int8/channel/sym' or 'bcq3/g128/weighted'")
        head, gran, third, *rest = parts
        kw: dict[str, Any] = {}
        try:
            if head.startswith("bcq"):
                kw.update(scheme="bcq", bits=int(head[3:]), bcq_method=third)
            elif head.startswith("uint"):
                kw.update(scheme="uniform", signed=False, bits=int(head[4:]))
            elif head.startswith("int"):
                kw.update(scheme="uniform", signed=True, bits=int(head[3:]))
            else:
                raise ValueError(head)
        except ValueError:
            raise SpecError(f"cannot parse QSpec {text!r}: first part must be intN, uintN or bcqN") from None
        if kw["scheme"] == "uniform":
            if third not in ("sym", "asym"):
                raise SpecError(f"cannot parse QSpec {text!r}: third part must be 'sym' or 'asym'")
            kw["symmetric"] = third == "sym"
        if gran.startswith("g") and gran[1:].isdigit():
            kw.update(granularity="group", group_size=int(gran[1:]))
        else:
            kw["granularity"] = gran
        keys = {v: k for k, v in _EXTRA_KEYS.items()}
        for p in rest:
            if p == "pow2":
                kw["pow2_scale"] = True
            elif p == "offset":
                kw["bcq_offset"] = True
            elif p == "dynamic":
                kw["dynamic"] = True
            elif "=" in p and p.split("=", 1)[0] in keys:
                k, v = p.split("=", 1)
                name = keys[k]
                kw[name] = _parse_value(name, v, text)
            else:
                raise SpecError(
                    f"cannot parse QSpec {text!r}: unknown part {p!r} (allowed: pow2, offset, dynamic, "
                    + ", ".join(f"{k}=..." for k in keys) + ")"
                )
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict with every field; `from_dict` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QSpec:
        """Build from `to_dict` output; missing fields take their defaults, unknown ones are an error."""
        if not isinstance(d, dict):
            raise SpecError(f"QSpec.from_dict needs a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SpecError(f"unknown QSpec field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes: Any) -> QSpec:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


# short keys for non-default fields in str(); kept round-trippable by `QSpec.parse`
_EXTRA_KEYS = {
    "axis": "axis",
    "observer": "obs",
    "bcq_rounds": "rounds",
    "importance_exp": "e",
    "importance_clip_quantile": "clipq",
    "scale_bits": "sb",
}


def _parse_value(name: str, v: str, text: str) -> Any:
    try:
        if name in ("axis", "bcq_rounds"):
            return int(v)
        if name == "scale_bits":
            return None if v == "None" else int(v)
        if name == "importance_exp":
            return float(v)
        if name == "importance_clip_quantile":
            return None if v == "None" else float(v)
        return v
    except ValueError:
        raise SpecError(f"cannot parse QSpec {text!r}: bad value {v!r} for {name}") from None


def _check_type(name: str, v: Any, t: type) -> None:
    if isinstance(v, bool) or not isinstance(v, t):
        raise SpecError(f"QSpec.{name} must be an {t.__name__}, got {v!r}")


AnnotationKey = int | Literal["output", "weight"]


@dataclass(frozen=True)
class Annotation:
    """The quantization decided for one node, stored in ``node.meta["qgraph.annotation"]``.

    ``inputs`` maps an input index to the spec of that (activation) input, ``weight`` is the spec of the
    node's weight constant, ``output`` the spec of its output. ``fallback_float=True`` means the node
    stays in float on purpose (then no spec may be set). BCQ is a weight-only scheme.
    """

    inputs: dict[int, QSpec] = field(default_factory=dict)
    weight: QSpec | None = None
    output: QSpec | None = None
    fallback_float: bool = False

    META_KEY = "qgraph.annotation"

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, dict):
            raise SpecError(f"Annotation.inputs must be a dict {{index: QSpec}}, got {type(self.inputs).__name__}")
        for k, v in self.inputs.items():
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise SpecError(f"Annotation.inputs keys are input indices (int >= 0), got {k!r}")
            self._check_spec(f"inputs[{k}]", v, activation=True)
        self._check_spec("weight", self.weight, activation=False)
        self._check_spec("output", self.output, activation=True)
        if self.fallback_float and (self.inputs or self.weight is not None or self.output is not None):
            raise SpecError("an Annotation with fallback_float=True keeps the node in float: it cannot carry specs")

    @staticmethod
    def _check_spec(where: str, spec: Any, activation: bool) -> None:
        if spec is None:
            return
        if not isinstance(spec, QSpec):
            raise SpecError(f"Annotation.{where} must be a QSpec or None, got {type(spec).__name__}")
        if activation and spec.scheme == "bcq":
            raise SpecError(f"Annotation.{where}: bcq is a weight-only scheme; activations use scheme='uniform'")
        if not activation and spec.dynamic:
            raise SpecError(f"Annotation.{where}: dynamic quantization is for activations; a weight is quantized "
                            f"once ahead of time: drop dynamic (e.g. 'int8/channel/sym')")

    def get(self, key: AnnotationKey) -> QSpec | None:
        """The spec for an input index, ``"weight"`` or ``"output"`` (None when not quantized)."""
        if key == "weight":
            return self.weight
        if key == "output":
            return self.output
        if isinstance(key, int) and not isinstance(key, bool):
            return self.inputs.get(key)
        raise SpecError(f"Annotation key must be an input index, 'weight' or 'output'; got {key!r}")

    @property
    def is_quantized(self) -> bool:
        return bool(self.inputs) or self.weight is not None or self.output is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": {str(k): v.to_dict() for k, v in sorted(self.inputs.items())},
            "weight": None if self.weight is None else self.weight.to_dict(),
            "output": None if self.output is None else self.output.to_dict(),
            "fallback_float": self.fallback_float,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Annotation:
        if not isinstance(d, dict):
            raise SpecError(f"Annotation.from_dict needs a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {"inputs", "weight", "output", "fallback_float"})
        if unknown:
            raise SpecError(f"unknown Annotation field(s) {unknown}; valid: inputs, weight, output, fallback_float")
        try:
            inputs = {int(k): QSpec.from_dict(v) for k, v in (d.get("inputs") or {}).items()}
        except ValueError:
            raise SpecError(f"Annotation inputs keys must be integer indices, got {list(d['inputs'])}") from None
        w, o = d.get("weight"), d.get("output")
        return cls(
            inputs=inputs,
            weight=None if w is None else QSpec.from_dict(w),
            output=None if o is None else QSpec.from_dict(o),
            fallback_float=bool(d.get("fallback_float", False)),
        )
