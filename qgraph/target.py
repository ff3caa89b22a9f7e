"""Targets: declarative device specs (``targets/*.toml``) validated into frozen dataclasses.

A target says which (op, scheme, weight bits, activation bits) combinations it can run and with
which kernel, which granularities / symmetries / scale forms its kernels take, which fusion
patterns it executes as one kernel, the default quantization it prefers, and cost-model figures.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import tomllib

from qgraph.errors import SpecError, TargetError
from qgraph.ir.ops import ATEN_OPS, FUNCTION_OPS, METHOD_OPS, MODULE_OPS
from qgraph.quant.qspec import QSpec

MAX_GROUP_SIZE = 1 << 16

KERNELS = ("biqgemm", "int8_gemm", "int8_conv", "int4_weight_only", "int8_weight_only", "int8_gather",
           "int4_gather", "float")
SCHEMES = ("uniform", "bcq")
GRANULARITIES = ("tensor", "channel", "group")
KNOWN_OPS = frozenset(MODULE_OPS.values()) | frozenset(FUNCTION_OPS.values()) | frozenset(
    METHOD_OPS.values()) | frozenset(ATEN_OPS.values())
# Input rows up to which the CPU BiQGEMM runs its LUT path (above: decode + GEMM), per mode, when a target does not
# say (measure a machine's with `python bench/biqgemm.py --calibrate`).
DEFAULT_BIQGEMM_LUT_MAX_ROWS = {"exact": 4, "fast": 4}


def rule(default: Any = MISSING, *, choices: Any = None, lo: float | None = None, hi: float | None = None,
         above: float | None = None, keys: tuple[str, ...] | None = None, required_keys: tuple[str, ...] = (),
         doc: str = "", toml: bool = True) -> Any:
    """A dataclass field with the constraints its TOML key is checked against (see ``_convert``).

    ``choices``: allowed values (of the scalar, or of each element of a tuple/dict); ``lo``/``hi``: inclusive
    bounds, ``above``: exclusive lower bound (numbers are also required to be finite); ``keys``: the keys a dict
    may have (given entries override the default's); ``required_keys``: keys a dict must have; ``toml=False``:
    not read from the file.
    """
    meta = {"choices": choices, "lo": lo, "hi": hi, "above": above, "keys": keys, "required_keys": required_keys,
            "doc": doc, "toml": toml}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


GROUP_SIZES = {"lo": 1, "hi": MAX_GROUP_SIZE}


@dataclass(frozen=True, kw_only=True)
class UniformCaps:
    """What uniform kernels accept: granularities, symmetry choices, scale form, group sizes."""

    weight_granularities: tuple[str, ...] = rule(("tensor", "channel", "group"), choices=GRANULARITIES)
    activation_granularities: tuple[str, ...] = rule(("tensor",), choices=(*GRANULARITIES, "token"))
    weight_symmetric: tuple[bool, ...] = rule((True, False))
    activation_symmetric: tuple[bool, ...] = rule((True, False))
    pow2_scales: str = rule("optional", choices=("optional", "required", "unsupported"))
    group_sizes: tuple[int, ...] = rule((32, 64, 128), **GROUP_SIZES)


@dataclass(frozen=True, kw_only=True)
class BCQCaps:
    granularities: tuple[str, ...] = rule(("channel", "group"), choices=("channel", "group"))
    group_sizes: tuple[int, ...] = rule((32, 64, 128), **GROUP_SIZES)
    offset: bool = rule(True)


@dataclass(frozen=True, kw_only=True)
class KernelRule:
    """Ops in ``ops`` with weights quantized by ``scheme`` at ``weight_bits`` (and activations at
    ``activation_bits``; empty = activations stay float) run on ``kernel``."""

    ops: tuple[str, ...] = rule(choices=KNOWN_OPS)
    scheme: str = rule(choices=SCHEMES)
    weight_bits: tuple[int, ...] = rule(lo=1, hi=8)
    activation_bits: tuple[int, ...] = rule((), lo=1, hi=8)
    kernel: str = rule(choices=KERNELS)

    def matches(self, op: str, scheme: str, weight_bits: int | None, activation_bits: int | None) -> bool:
        if op not in self.ops or scheme != self.scheme:
            return False
        if weight_bits is not None and weight_bits not in self.weight_bits:
            return False
        if activation_bits is None:
            return not self.activation_bits or self.kernel.endswith("weight_only") or 0 in self.activation_bits
        return activation_bits in self.activation_bits


@dataclass(frozen=True, kw_only=True)
class CostFigures:
    """Roofline figures; ``sources`` says where each number comes from."""

    memory_bandwidth_gbps: float = rule(above=0)
    macs_per_second: dict[str, float] = rule(above=0, required_keys=("fp32",))
    lut_lookups_per_second: float = rule(above=0)
    call_overhead_us: float = rule(lo=0)
    cache_bytes: int = rule(32 * 1024 * 1024, lo=0)
    sources: dict[str, str] = rule(dict)
    # CPU BiQGEMM: input rows up to which the LUT path wins, per mode ("exact", "fast"); measured crossover.
    biqgemm_lut_max_rows: dict[str, int] = rule(lambda: dict(DEFAULT_BIQGEMM_LUT_MAX_ROWS), lo=0,
                                                keys=tuple(DEFAULT_BIQGEMM_LUT_MAX_ROWS))


@dataclass(frozen=True, kw_only=True)
class Defaults:
    weight: QSpec = rule()
    activation: QSpec | None = rule(None)
    embedding: QSpec | None = rule(None)


@dataclass(frozen=True, kw_only=True)
class Target:
    """A device: what it runs (``kernels``, capabilities), what it prefers (``defaults``), what it costs.

    Its fields are the TOML's keys: ``load_target`` checks a file against them (``_convert``), so a new field with
    a ``rule(...)`` is a new, validated key.
    """

    name: str = rule()
    description: str = rule("")
    accumulator_bits: int = rule(32, choices=(16, 32))
    float_ops: tuple[str, ...] = rule((), choices=KNOWN_OPS)
    fusions: tuple[str, ...] = rule(())
    uniform: UniformCaps = rule(UniformCaps)
    bcq: BCQCaps | None = rule(None)
    kernels: tuple[KernelRule, ...] = rule()
    defaults: Defaults = rule()
    cost: CostFigures = rule()
    source: str = rule("", toml=False)

    @property
    def supports_bcq(self) -> bool:
        return self.bcq is not None and any(k.scheme == "bcq" for k in self.kernels)

    def kernel_for(self, op: str, weight: QSpec | None, activation: QSpec | None) -> str | None:
        """The kernel that runs ``op`` with these specs, or None when the target cannot."""
        if weight is None and activation is None:
            return "float"
        scheme = weight.scheme if weight is not None else "uniform"
        wbits = weight.bits if weight is not None else None
        abits = activation.bits if activation is not None else None
        for rule in self.kernels:
            if rule.matches(op, scheme, wbits, abits):
                return rule.kernel
        return None

    def check(self, op: str, weight: QSpec | None, activation: QSpec | None) -> list[str]:
        """Reasons this target cannot run ``op`` with these specs (empty list: it can)."""
        reasons = []
        if weight is not None and weight.scheme == "bcq":
            if self.bcq is None:
                return [f"target {self.name} has no binary-coding (BCQ) kernels"]
            if weight.granularity not in self.bcq.granularities:
                reasons.append(f"BCQ granularity {weight.granularity!r} not in {list(self.bcq.granularities)}")
            if weight.granularity == "group" and weight.group_size not in self.bcq.group_sizes:
                reasons.append(f"BCQ group size {weight.group_size} not in {list(self.bcq.group_sizes)}")
            if weight.bcq_offset and not self.bcq.offset:
                reasons.append("BCQ offset (z) unsupported")
        elif weight is not None:
            u = self.uniform
            if weight.granularity not in u.weight_granularities:
                reasons.append(f"weight granularity {weight.granularity!r} not in {list(u.weight_granularities)}")
            if weight.granularity == "group" and weight.group_size not in u.group_sizes:
                reasons.append(f"weight group size {weight.group_size} not in {list(u.group_sizes)}")
            if weight.symmetric not in u.weight_symmetric:
                reasons.append("asymmetric weights unsupported" if u.weight_symmetric == (True,)
                               else "symmetric weights unsupported")
            reasons += _pow2_reason("weight", weight, u.pow2_scales)
        if activation is not None:
            u = self.uniform
            if activation.scheme != "uniform":
                reasons.append("activations can only be quantized uniformly")
            if activation.granularity not in u.activation_granularities:
                reasons.append(f"activation granularity {activation.granularity!r} not in "
                               f"{list(u.activation_granularities)}")
            if activation.symmetric not in u.activation_symmetric:
                reasons.append("asymmetric activations unsupported" if u.activation_symmetric == (True,)
                               else "symmetric activations unsupported")
            reasons += _pow2_reason("activation", activation, u.pow2_scales)
        if not reasons and self.kernel_for(op, weight, activation) is None:
            w = "float" if weight is None else f"{weight.scheme}{weight.bits}"
            a = "float" if activation is None else f"int{activation.bits}"
            reasons.append(f"no kernel for {op} with weights {w} and activations {a}")
        return reasons


def _pow2_reason(what: str, spec: QSpec, mode: str) -> list[str]:
    if mode == "required" and not spec.pow2_scale:
        return [f"{what} scales must be powers of two (pow2_scale=True)"]
    if mode == "unsupported" and spec.pow2_scale:
        return [f"power-of-two {what} scales unsupported"]
    return []


# --- loading -----------------------------------------------------------------------------------
def list_targets() -> list[str]:
    """Names of the targets shipped with qgraph."""
    files = importlib.resources.files("qgraph.targets")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".toml") and not p.name.startswith("_"))


def load_target(name_or_path: str | Path) -> Target:
    """Load a shipped target by name (``"x86-avx2"``) or a user's TOML file by path."""
    if isinstance(name_or_path, Target):
        return name_or_path
    raw, where = _read_with_inheritance(str(name_or_path), chain=())
    return _build(raw, where)


def _locate(ref: str, relative_to: Path | None) -> Path:
    p = Path(ref)
    if ref.endswith(".toml") or p.exists():
        if not p.is_absolute() and relative_to is not None and (relative_to.parent / p).exists():
            p = relative_to.parent / p
        if not p.exists():
            raise TargetError(f"target file {ref} does not exist")
        return p
    shipped = importlib.resources.files("qgraph.targets") / f"{ref}.toml"
    if not shipped.is_file():
        raise TargetError(f"unknown target {ref!r}; shipped targets: {', '.join(list_targets())} "
                          f"(or pass the path of a .toml file)")
    return Path(str(shipped))


def _read_with_inheritance(ref: str, chain: tuple[str, ...], relative_to: Path | None = None) -> tuple[dict, str]:
    path = _locate(ref, relative_to)
    key = str(path.resolve())
    if key in chain:
        names = " -> ".join(Path(c).stem for c in chain + (key,))
        raise TargetError(f"{path}: 'inherits' forms a cycle: {names}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise TargetError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise TargetError(f"{path}: cannot read: {e}") from None
    parents = raw.pop("inherits", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise TargetError(f"{path}: key 'inherits' must be a target name or a list of names")
    merged: dict = {}
    for parent in parents:
        parent_raw, _ = _read_with_inheritance(parent, chain + (key,), path)
        merged = _merge(merged, parent_raw)
    return _merge(merged, raw), str(path)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _convert(value: Any, tp: Any, meta: dict, key: str, where: str) -> Any:
    """``value`` from the TOML as a ``tp`` (a field's type) obeying ``meta`` (its ``rule``); else a TargetError
    naming ``where`` (the file), ``key`` (table.key) and what is allowed."""

    def fail(msg: str) -> TargetError:
        return TargetError(f"{where}: key '{key}' {msg}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # "X | None": an absent table, `false`, or "float" is None
        inner = next(a for a in args if a is not type(None))
        if value is False or (inner is QSpec and value == "float"):
            return None
        return _convert(value, inner, meta, key, where)
    if tp is QSpec:
        if not isinstance(value, str):
            raise fail(f"must be a QSpec string such as 'int8/channel/sym', got {value!r}")
        if value == "float":
            raise fail("must name a quantization (e.g. 'int8/channel/sym'), not float")
        try:
            return QSpec.parse(value)
        except SpecError as e:
            raise fail(f"is not a valid QSpec string: {e}") from None
    if is_dataclass(tp):
        return _from_table(tp, value, key, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise fail(f"must be a list of {_type_name(args[0])}, got {value!r}")
        return tuple(_convert(x, args[0], meta, f"{key}[{i}]", where) if is_dataclass(args[0])
                     else _scalar(x, args[0], meta, fail, element=True) for i, x in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise fail(f"must be a table of {_type_name(args[1])} values, got {value!r}")
        keys = meta.get("keys")
        out = {}
        for k, v in value.items():
            if keys is not None and k not in keys:
                raise TargetError(f"{where}: key '{key}.{k}' is not allowed; allowed keys: {', '.join(keys)}")
            out[k] = _scalar(v, args[1], meta, lambda msg, k=k: TargetError(f"{where}: key '{key}.{k}' {msg}"))
        for k in meta.get("required_keys", ()):
            if k not in out:
                raise fail(f"needs at least a {k!r} entry")
        return out
    return _scalar(value, tp, meta, fail)


def _scalar(value: Any, tp: type, meta: dict, fail: Any, element: bool = False) -> Any:
    what = "an element" if element else "a value"
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and tp is not bool or not isinstance(value, tp):
        return _raise(fail(f"must be {'a list of ' if element else ''}{_type_name(tp)}, got {what} {value!r} "
                           f"({_type_name(type(value))})"))
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        shown = ", ".join(sorted(map(str, choices))) if len(choices) < 12 else "the canonical ONNX op names"
        return _raise(fail(f"has {what} {value!r} that is not allowed; allowed: {shown}"))
    if tp in (int, float):
        lo, hi, above = meta.get("lo"), meta.get("hi"), meta.get("above")
        bad = not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi) \
            or (above is not None and value <= above)
        if bad:
            bounds = [f"> {above}" if above is not None else "", f">= {lo}" if lo is not None else "",
                      f"<= {hi}" if hi is not None else ""]
            return _raise(fail(f"has {what} {value!r} out of range; allowed: {'finite ' if tp is float else ''}"
                               f"{_type_name(tp)} {' and '.join(b for b in bounds if b)}"))
    return value


def _raise(e: Exception) -> Any:
    raise e


def _type_name(tp: Any) -> str:
    if is_dataclass(tp):
        return "tables"
    return {str: "str", int: "int", float: "float", bool: "bool", list: "list", dict: "table"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def toml_keys(cls: type) -> dict[str, dataclasses.Field]:
    """The TOML keys of a target table: the dataclass's fields (less those marked ``toml=False``)."""
    return {f.name: f for f in fields(cls) if f.metadata.get("toml", True)}


def _from_table(cls: type, table: Any, prefix: str, where: str) -> Any:
    """Build dataclass ``cls`` from a TOML table: unknown keys, missing required keys, wrong types and values out
    of range are TargetErrors naming the file, the key and what is allowed."""
    name = f"key '{prefix}'" if prefix else "the top level"
    if not isinstance(table, dict):
        raise TargetError(f"{where}: {name} must be a table, got {table!r}")
    allowed = toml_keys(cls)
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        k = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise TargetError(f"{where}: unknown key '{k}'; allowed keys{' in [' + prefix + ']' if prefix else ''}: "
                          f"{', '.join(allowed)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, f in allowed.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in table:
            if f.default is MISSING and f.default_factory is MISSING:
                raise TargetError(f"{where}: key '{key}' is missing")
            continue
        value = _convert(table[k], hints[k], dict(f.metadata), key, where)
        if f.metadata.get("keys") is not None and f.default_factory is not MISSING:
            value = {**f.default_factory(), **value}  # entries given override the defaults, the rest stay
        kwargs[k] = value
    return cls(**kwargs)


def _build(raw: dict, where: str) -> Target:
    target = _from_table(Target, raw, "", where)
    target = dataclasses.replace(target, source=where)
    for i, kr in enumerate(target.kernels):  # checks across tables
        if kr.scheme == "bcq" and target.bcq is None:
            raise TargetError(f"{where}: key 'kernels[{i}].scheme' is 'bcq' but the target has no [bcq] table")
    d = target.defaults
    for label, spec in (("weight", d.weight), ("activation", d.activation)):
        if spec is None:
            continue
        problems = target.check("Gemm", spec if label == "weight" else None, spec if label == "activation" else None)
        problems = [p for p in problems if not p.startswith("no kernel")]
        if problems:
            raise TargetError(f"{where}: key 'defaults.{label}' names a quantization the target itself rejects: "
                              f"{problems[0]}")
    return target
