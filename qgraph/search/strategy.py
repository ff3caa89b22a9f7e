"""`Strategy`: a per-node quantization decision (node key → `Annotation`) as plain, hashable data.

A strategy is what a search trial evaluates, what the trial cache is keyed by and what the user gets
back. It prints as a strategy file (JSON or TOML) plus the pipeline that applies it, round-trips through
both, and hashes stably (sha256 of its canonical JSON).

Each annotation has a one-line text form built from `QSpec`'s own round-tripping text:
``"float"`` (kept in float on purpose), ``"bcq3/g128/weighted"`` (weight only), or
``"int8/channel/sym in0=uint8/tensor/asym"`` (weight plus activation input 0); an output spec is
written ``out=...``. ``"none"`` stands for "no weight spec" when only activations are quantized.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from qgraph.errors import SpecError
from qgraph.quant.qspec import Annotation, QSpec

FORMAT_VERSION = 1
CANONICALIZE = "fold-bn,dce,fuse-activation"


def annotation_to_text(ann: Annotation) -> str:
    """The one-line text form of an annotation (see the module docstring)."""
    if ann.fallback_float or not ann.is_quantized:
        return "float"
    parts = [str(ann.weight) if ann.weight is not None else "none"]
    parts += [f"in{k}={spec}" for k, spec in sorted(ann.inputs.items())]
    if ann.output is not None:
        parts.append(f"out={ann.output}")
    return " ".join(parts)


OPTIMIZER_NAMES = ("rtn", "gptq", "aespa")


def entry_text(ann: Annotation, optimizer: str = "rtn") -> str:
    """An annotation's text plus `` opt=<optimizer>`` when a weight optimizer other than RTN fits it."""
    text = annotation_to_text(ann)
    return text if optimizer == "rtn" or text == "float" else f"{text} opt={optimizer}"


def entry_from_text(text: str) -> tuple[Annotation, str]:
    """Inverse of `entry_text`: (annotation, optimizer)."""
    parts = text.split() if isinstance(text, str) else []
    opts = [p.partition("=")[2] for p in parts if p.startswith("opt=")]
    optimizer = opts[-1] if opts else "rtn"
    if optimizer not in OPTIMIZER_NAMES:
        raise SpecError(f"strategy entry {text!r}: unknown optimizer {optimizer!r} (use {', '.join(OPTIMIZER_NAMES)})")
    ann = annotation_from_text(" ".join(p for p in parts if not p.startswith("opt=")) if opts else text)
    return ann, optimizer


def annotation_from_text(text: str) -> Annotation:
    """Inverse of `annotation_to_text`."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"a strategy entry must be a non-empty string such as 'bcq3/g128/weighted', got {text!r}")
    head, *rest = text.split()
    if head == "float" and not rest:
        return Annotation(fallback_float=True)
    weight = None if head == "none" else QSpec.parse(head)
    inputs: dict[int, QSpec] = {}
    output = None
    for part in rest:
        key, sep, spec = part.partition("=")
        if not sep:
            raise SpecError(f"strategy entry {text!r}: expected 'inN=<spec>' or 'out=<spec>', got {part!r}")
        if key == "out":
            output = QSpec.parse(spec)
        elif key.startswith("in") and key[2:].isdigit():
            inputs[int(key[2:])] = QSpec.parse(spec)
        else:
            raise SpecError(f"strategy entry {text!r}: unknown part {part!r} (use inN=<spec> or out=<spec>)")
    return Annotation(inputs=inputs, weight=weight, output=output)


@dataclass(frozen=True)
class Strategy:
    """Node key (qualname, or node name where qualnames collide) → Annotation, for one target.

    ``target`` names the target the strategy was searched for (informational: the hash covers it, so a
    strategy searched for another target is another trial). ``optimizers``: node key → weight optimizer
    (``gptq`` / ``aespa``) for nodes not rounded to nearest.
    """

    annotations: Mapping[str, Annotation] = field(default_factory=dict)
    target: str = ""
    optimizers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for k, v in self.annotations.items():
            if not isinstance(k, str) or not isinstance(v, Annotation):
                raise SpecError(f"Strategy maps node keys (str) to Annotations; got {k!r}: {type(v).__name__}")
        object.__setattr__(self, "annotations", dict(sorted(self.annotations.items())))
        for k, o in self.optimizers.items():
            if k not in self.annotations or o not in OPTIMIZER_NAMES:
                raise SpecError(f"Strategy.optimizers: {k!r}: {o!r} must name an annotated node and one of "
                                f"{', '.join(OPTIMIZER_NAMES)}")
        object.__setattr__(self, "optimizers", {k: o for k, o in sorted(self.optimizers.items()) if o != "rtn"})

    # --- identity ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, "target": self.target,
                "nodes": {k: self.text_of(k) for k in self.annotations}}

    def text_of(self, key: str) -> str:
        return entry_text(self.annotations[key], self.optimizers.get(key, "rtn"))

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def sha256(self) -> str:
        """Stable content hash: sha256 of the canonical JSON."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def __hash__(self) -> int:
        return hash(self.canonical_json())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Strategy) and self.canonical_json() == other.canonical_json()

    # --- serialization ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Strategy:
        if not isinstance(d, Mapping) or not isinstance(d.get("nodes"), Mapping):
            raise SpecError("a strategy needs a table 'nodes' mapping node names to specs "
                            "(e.g. {\"nodes\": {\"fc1\": \"bcq3/g128/weighted\"}})")
        version = d.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise SpecError(f"strategy format version {version} is not supported (this qgraph reads {FORMAT_VERSION})")
        entries = {str(k): entry_from_text(v) if isinstance(v, str) else (annotation_from_text(v), "rtn")
                   for k, v in d["nodes"].items()}
        return cls({k: a for k, (a, _) in entries.items()}, str(d.get("target", "")),
                   {k: o for k, (_, o) in entries.items() if o != "rtn"})

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps({**self.to_dict(), "pipeline": self.pipeline()}, indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Strategy:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise SpecError(f"strategy JSON does not parse: {e}") from None

    def to_toml(self) -> str:
        """A TOML strategy file: ``version``, ``target``, ``pipeline`` and a ``[nodes]`` table."""
        lines = [f"version = {FORMAT_VERSION}", f"target = {_toml_str(self.target)}",
                 f"pipeline = {_toml_str(self.pipeline())}", "", "[nodes]"]
        lines += [f"{_toml_str(k)} = {_toml_str(self.text_of(k))}" for k in self.annotations]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str) -> Strategy:
        try:
            return cls.from_dict(tomllib.loads(text))
        except tomllib.TOMLDecodeError as e:
            raise SpecError(f"strategy TOML does not parse: {e}") from None

    def save(self, path: str | Path) -> Path:
        """Write as ``.json`` or ``.toml`` (by suffix)."""
        p = Path(path)
        p.write_text(self.to_toml() if p.suffix == ".toml" else self.to_json())
        return p

    @classmethod
    def load(cls, path: str | Path) -> Strategy:
        p = Path(path)
        if not p.is_file():
            raise SpecError(f"strategy file {p} does not exist")
        return cls.from_toml(p.read_text()) if p.suffix == ".toml" else cls.from_json(p.read_text())

    # --- use -------------------------------------------------------------------------------------
    @property
    def needs_calibration(self) -> bool:
        return any(a.inputs or a.output is not None for a in self.annotations.values())

    def pipeline(self) -> str:
        """The pass pipeline that applies this strategy (give it to `qgraph.quantize` with
        ``strategy=strategy.config()``): canonicalize, annotate, check-target, [calibrate,]
        quantize-weights, insert-fq."""
        calib = ",calibrate" if self.needs_calibration else ""
        return f"{CANONICALIZE},annotate,check-target{calib},quantize-weights,insert-fq"

    def config(self) -> dict[str, Annotation]:
        """The ``strategy=`` argument of `qgraph.quantize` (``ctx.config["strategy"]``)."""
        return dict(self.annotations)

    def replace(self, **changes: Annotation) -> Strategy:
        return Strategy({**self.annotations, **changes}, self.target,
                        {k: o for k, o in self.optimizers.items() if k not in changes})

    def __len__(self) -> int:
        return len(self.annotations)

    def __str__(self) -> str:
        width = max((len(k) for k in self.annotations), default=0)
        return "\n".join(f"{k:<{width}}  {self.text_of(k)}" for k in self.annotations)


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid TOML basic string
