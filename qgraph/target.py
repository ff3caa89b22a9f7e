"""Targets: declarative device specs (``targets/*.toml``) validated into frozen dataclasses.

A target says which (op, scheme, weight bits, activation bits) combinations it can run and with
which kernel, which granularities / symmetries / scale forms its kernels take, which fusion
patterns it executes as one kernel, the default quantization it prefers, and cost-model figures.
"""
from __future__ import annotations

import importlib.resources
import math
from dataclasses import dataclass, field
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

_TOP_KEYS = {"name", "description", "inherits", "accumulator_bits", "float_ops", "fusions", "defaults",
             "uniform", "bcq", "kernels", "cost"}
_UNIFORM_KEYS = {"weight_granularities", "activation_granularities", "weight_symmetric", "activation_symmetric",
                 "pow2_scales", "group_sizes"}
_BCQ_KEYS = {"granularities", "group_sizes", "offset"}
_KERNEL_KEYS = {"ops", "scheme", "weight_bits", "activation_bits", "kernel"}
_DEFAULT_KEYS = {"weight", "activation", "embedding"}
_COST_KEYS = {"memory_bandwidth_gbps", "macs_per_second", "lut_lookups_per_second", "call_overhead_us",
              "cache_bytes", "biqgemm_lut_max_rows", "sources"}
# Input rows up to which the CPU BiQGEMM runs its LUT path (above: decode + GEMM), per mode, when a target does not
# say (measure a machine's with `python bench/biqgemm.py --calibrate`).
DEFAULT_BIQGEMM_LUT_MAX_ROWS = {"exact": 4, "fast": 4}


@dataclass(frozen=True)
class UniformCaps:
    """What uniform kernels accept: granularities, symmetry choices, scale form, group sizes."""

    weight_granularities: tuple[str, ...] = ("tensor", "channel", "group")
    activation_granularities: tuple[str, ...] = ("tensor",)
    weight_symmetric: tuple[bool, ...] = (True, False)
    activation_symmetric: tuple[bool, ...] = (True, False)
    pow2_scales: str = "optional"  # "optional" | "required" | "unsupported"
    group_sizes: tuple[int, ...] = (32, 64, 128)


@dataclass(frozen=True)
class BCQCaps:
    granularities: tuple[str, ...] = ("channel", "group")
    group_sizes: tuple[int, ...] = (32, 64, 128)
    offset: bool = True


@dataclass(frozen=True)
class KernelRule:
    """Ops in ``ops`` with weights quantized by ``scheme`` at ``weight_bits`` (and activations at
    ``activation_bits``; empty = activations stay float) run on ``kernel``."""

    ops: tuple[str, ...]
    scheme: str
    weight_bits: tuple[int, ...]
    activation_bits: tuple[int, ...]
    kernel: str

    def matches(self, op: str, scheme: str, weight_bits: int | None, activation_bits: int | None) -> bool:
        if op not in self.ops or scheme != self.scheme:
            return False
        if weight_bits is not None and weight_bits not in self.weight_bits:
            return False
        if activation_bits is None:
            return not self.activation_bits or self.kernel.endswith("weight_only") or 0 in self.activation_bits
        return activation_bits in self.activation_bits


@dataclass(frozen=True)
class CostFigures:
    """Roofline figures; ``sources`` says where each number comes from."""

    memory_bandwidth_gbps: float
    macs_per_second: dict[str, float]
    lut_lookups_per_second: float
    call_overhead_us: float
    cache_bytes: int = 32 * 1024 * 1024
    sources: dict[str, str] = field(default_factory=dict)
    # CPU BiQGEMM: input rows up to which the LUT path wins, per mode ("exact", "fast"); measured crossover.
    biqgemm_lut_max_rows: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_BIQGEMM_LUT_MAX_ROWS))


@dataclass(frozen=True)
class Defaults:
    weight: QSpec
    activation: QSpec | None
    embedding: QSpec | None


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    accumulator_bits: int
    float_ops: tuple[str, ...]
    fusions: tuple[str, ...]
    uniform: UniformCaps
    bcq: BCQCaps | None
    kernels: tuple[KernelRule, ...]
    defaults: Defaults
    cost: CostFigures
    source: str = ""

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


class _Reader:
    """Typed access to one table of the TOML, with errors naming file, key and allowed values."""

    def __init__(self, where: str, table: Any, prefix: str, allowed: set[str]):
        self.where, self.prefix = where, prefix
        if not isinstance(table, dict):
            raise TargetError(f"{where}: '{prefix}' must be a table")
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise TargetError(f"{where}: unknown key '{self.key(unknown[0])}'; allowed keys: {', '.join(sorted(allowed))}")
        self.table = table

    def key(self, k: str) -> str:
        return f"{self.prefix}.{k}" if self.prefix else k

    def fail(self, k: str, msg: str) -> TargetError:
        return TargetError(f"{self.where}: key '{self.key(k)}' {msg}")

    def get(self, k: str, typ: type | tuple, default: Any = ..., *, choices: tuple | None = None) -> Any:
        if k not in self.table:
            if default is ...:
                raise self.fail(k, "is missing")
            return default
        v = self.table[k]
        if isinstance(v, bool) and typ in (int, float) or not isinstance(v, typ):
            if typ is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            else:
                names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
                raise self.fail(k, f"must be {names}, got {v!r}")
        if choices is not None and v not in choices:
            raise self.fail(k, f"must be one of {', '.join(map(str, choices))}; got {v!r}")
        return v

    def get_list(self, k: str, item: type, default: Any = ..., *, choices: tuple | frozenset | None = None) -> tuple:
        v = self.get(k, list, default)
        if not isinstance(v, (list, tuple)):
            return v
        for x in v:
            if isinstance(x, bool) and item is int or not isinstance(x, item):
                raise self.fail(k, f"must be a list of {item.__name__}, got element {x!r}")
            if choices is not None and x not in choices:
                shown = ", ".join(sorted(map(str, choices))) if len(choices) < 12 else "the canonical ONNX op names"
                raise self.fail(k, f"has unknown value {x!r}; allowed: {shown}")
        return tuple(v)

    def get_spec(self, k: str, default: Any = ...) -> QSpec | None:
        v = self.get(k, str, default)
        if v is None or v == "float":
            return None
        try:
            return QSpec.parse(v)
        except SpecError as e:
            raise self.fail(k, f"is not a valid QSpec string: {e}") from None


def _build(raw: dict, where: str) -> Target:
    top = _Reader(where, raw, "", _TOP_KEYS)
    name = top.get("name", str)
    uni = _Reader(where, top.get("uniform", dict, {}), "uniform", _UNIFORM_KEYS)
    uniform = UniformCaps(
        weight_granularities=uni.get_list("weight_granularities", str, ("tensor", "channel", "group"),
                                          choices=GRANULARITIES),
        activation_granularities=uni.get_list("activation_granularities", str, ("tensor",), choices=GRANULARITIES),
        weight_symmetric=uni.get_list("weight_symmetric", bool, (True, False)),
        activation_symmetric=uni.get_list("activation_symmetric", bool, (True, False)),
        pow2_scales=uni.get("pow2_scales", str, "optional", choices=("optional", "required", "unsupported")),
        group_sizes=_group_sizes(uni, "group_sizes"),
    )
    bcq = None
    if "bcq" in raw and raw["bcq"] is not False:
        b = _Reader(where, top.get("bcq", dict), "bcq", _BCQ_KEYS)
        bcq = BCQCaps(
            granularities=b.get_list("granularities", str, ("channel", "group"), choices=("channel", "group")),
            group_sizes=_group_sizes(b, "group_sizes"),
            offset=b.get("offset", bool, True),
        )
    kernels = []
    rules = top.get("kernels", list)
    for i, rule in enumerate(rules):
        r = _Reader(where, rule, f"kernels[{i}]", _KERNEL_KEYS)
        kr = KernelRule(
            ops=r.get_list("ops", str, choices=KNOWN_OPS),
            scheme=r.get("scheme", str, choices=SCHEMES),
            weight_bits=r.get_list("weight_bits", int),
            activation_bits=r.get_list("activation_bits", int, ()),
            kernel=r.get("kernel", str, choices=KERNELS),
        )
        if kr.scheme == "bcq" and bcq is None:
            raise r.fail("scheme", "is 'bcq' but the target has no [bcq] table")
        bad = [b for b in kr.weight_bits if not (1 <= b <= 8)]
        if bad:
            raise r.fail("weight_bits", f"has {bad[0]}; bit widths are 1..8")
        kernels.append(kr)
    d = _Reader(where, top.get("defaults", dict), "defaults", _DEFAULT_KEYS)
    defaults = Defaults(weight=d.get_spec("weight"), activation=d.get_spec("activation", None),
                        embedding=d.get_spec("embedding", None))
    if defaults.weight is None:
        raise d.fail("weight", "must name a quantization (e.g. 'int8/channel/sym'), not float")
    c = _Reader(where, top.get("cost", dict), "cost", _COST_KEYS)
    macs = c.get("macs_per_second", dict)
    for k, v in macs.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise c.fail(f"macs_per_second.{k}", f"must be a finite number > 0, got {v!r}")
    cost = CostFigures(
        memory_bandwidth_gbps=_positive(c, "memory_bandwidth_gbps"),
        macs_per_second={k: float(v) for k, v in macs.items()},
        lut_lookups_per_second=_positive(c, "lut_lookups_per_second"),
        call_overhead_us=_non_negative(c, "call_overhead_us", float, ...),
        cache_bytes=_non_negative(c, "cache_bytes", int, 32 * 1024 * 1024),
        sources={str(k): str(v) for k, v in c.get("sources", dict, {}).items()},
        biqgemm_lut_max_rows=_lut_rows(c),
    )
    if "fp32" not in cost.macs_per_second:
        raise c.fail("macs_per_second", "needs at least an 'fp32' entry")
    target = Target(
        name=name,
        description=top.get("description", str, ""),
        accumulator_bits=top.get("accumulator_bits", int, 32, choices=(16, 32)),
        float_ops=top.get_list("float_ops", str, (), choices=KNOWN_OPS),
        fusions=top.get_list("fusions", str, ()),
        uniform=uniform, bcq=bcq, kernels=tuple(kernels), defaults=defaults, cost=cost, source=where,
    )
    for label, spec in (("weight", defaults.weight), ("activation", defaults.activation)):
        if spec is None:
            continue
        problems = target.check("Gemm", spec if label == "weight" else None, spec if label == "activation" else None)
        problems = [p for p in problems if not p.startswith("no kernel")]
        if problems:
            raise d.fail(label, f"names a quantization the target itself rejects: {problems[0]}")
    return target


def _lut_rows(r: _Reader) -> dict[str, int]:
    rows = dict(DEFAULT_BIQGEMM_LUT_MAX_ROWS)
    for mode, v in r.get("biqgemm_lut_max_rows", dict, {}).items():
        if mode not in rows:
            raise r.fail(f"biqgemm_lut_max_rows.{mode}", f"is not a BiQGEMM mode; use {sorted(rows)}")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise r.fail(f"biqgemm_lut_max_rows.{mode}", f"must be an int >= 0, got {v!r}")
        rows[mode] = v
    return rows


def _positive(r: _Reader, k: str) -> float:
    v = r.get(k, float)
    if not math.isfinite(v) or v <= 0:
        raise r.fail(k, f"must be a finite number > 0, got {v}")
    return v


def _non_negative(r: _Reader, k: str, typ: type, default: Any) -> Any:
    v = r.get(k, typ, default)
    if not math.isfinite(v) or v < 0:
        raise r.fail(k, f"must be a finite number ≥ 0, got {v}")
    return v


def _group_sizes(r: _Reader, k: str) -> tuple[int, ...]:
    sizes = r.get_list(k, int, (32, 64, 128))
    bad = [g for g in sizes if not 1 <= g <= MAX_GROUP_SIZE]
    if bad:
        raise r.fail(k, f"has {bad[0]}; group sizes are 1..{MAX_GROUP_SIZE}")
    return sizes
