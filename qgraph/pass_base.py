"""`Pass`, `PassResult` and typed pass options.

A pass is a class with a nested frozen ``Options`` dataclass and a ``run(graph, ctx)`` method, or a
function whose keyword-only parameters become its options. Both register by name with
`qgraph.registry.register_pass` and can then appear in textual pipelines.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from qgraph.context import PassContext
from qgraph.errors import OptionError, PipelineError

#: An option value that needs no quotes in pipeline text.
BARE_VALUE = re.compile(r"[^\s,{}\[\]=\"]+")


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly new) graph, whether it changed, which analyses survive."""

    graph: Any
    modified: bool
    preserved: frozenset[str] = frozenset()
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NoOptions:
    pass


class Pass:
    """Base class of every pass.

    Class attributes: ``name`` (set by ``register_pass``), ``Options`` (a frozen dataclass),
    ``after``/``before`` (ordering constraints on other pass names, checked when both appear in one
    pipeline), ``requires``/``ensures`` (graph properties needed / established), ``frontends`` (the IR
    families it runs on, checked by `PassManager` before anything runs).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    requires_properties: ClassVar[frozenset[str]] = frozenset()
    ensures_properties: ClassVar[frozenset[str]] = frozenset()
    #: IR families the pass runs on (``GraphView.ir``: ``"fx"`` for symbolic_trace / torch.export graphs,
    #: ``"onnx"``); `PassManager` refuses it on others, saying why (``frontend_reason``).
    frontends: ClassVar[frozenset[str] | set[str]] = frozenset({"fx", "onnx"})
    frontend_reason: ClassVar[str] = ""

    def __init__(self, options: Any = None, /, **kwargs: Any):
        if options is not None and kwargs:
            raise PipelineError(f"pass '{self.name}': give an Options object or keyword options, not both")
        if options is None:
            options = bind_options(self.name, self.Options, kwargs)
            self._explicit = {k: format_value(v) for k, v in kwargs.items()}
        else:
            self._explicit = {
                f.name: format_value(getattr(options, f.name))
                for f in dataclasses.fields(options)
                if getattr(options, f.name) != _default_of(f)
            }
        self.options = options

    def requires(self) -> frozenset[str]:
        return self.requires_properties

    def ensures(self) -> frozenset[str]:
        return self.ensures_properties

    def run(self, graph: Any, ctx: Any) -> PassResult:
        raise NotImplementedError(f"pass '{self.name}' does not implement run()")

    def __call__(self, graph: Any, ctx: Any = None) -> PassResult:
        return self.run(graph, ctx if ctx is not None else PassContext())

    def __str__(self) -> str:
        if not self._explicit:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in self._explicit.items()) + "}"

    def __repr__(self) -> str:
        return f"<Pass {self}>"


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def option_fields(options_cls: type) -> dict[str, tuple[Any, Any]]:
    """name → (type, default) for an Options dataclass, with string annotations resolved."""
    hints = typing.get_type_hints(options_cls)
    return {f.name: (hints[f.name], _default_of(f)) for f in dataclasses.fields(options_cls)}


def describe_options(options_cls: type) -> str:
    parts = []
    for name, (tp, default) in option_fields(options_cls).items():
        d = "" if default is dataclasses.MISSING else f"={format_value(default)}"
        parts.append(f"{name}: {type_name(tp)}{d}")
    return ", ".join(parts) if parts else "(no options)"


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


# --- values: coercion from pipeline text and canonical formatting --------------------------
class QuotedStr(str):
    """A string value that was written in double quotes (so ``"none"`` stays a string)."""


_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a parsed pipeline value (str, or list of str) or a Python value to ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (value == "none" and not isinstance(value, QuotedStr))):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except PipelineError as e:
                errors.append(str(e))
        raise PipelineError(f"{where}: expected {type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        for a in allowed:
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        raise PipelineError(f"{where}: expected one of {', '.join(map(str, allowed))}; got {value!r}")
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(coerce(v, item_tp, where) for v in items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise PipelineError(f"{where}: expected a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise PipelineError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value), 0)
        except ValueError:
            raise PipelineError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise PipelineError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise PipelineError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, str):
            return value
        raise PipelineError(f"{where}: expected a string, got {value!r}")
    if isinstance(value, tp):
        return value
    raise PipelineError(f"{where}: cannot convert {value!r} to {type_name(tp)}")


def quote_if_needed(text: str) -> str:
    """``text`` as a pipeline value: bare when it can be, else double-quoted with escapes."""
    if BARE_VALUE.fullmatch(text) and text != "none":
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_value(value: Any) -> str:
    """Canonical pipeline text of an option value (parses back to the same value)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return quote_if_needed(str(value))


def bind_options(pass_name: str, options_cls: type, raw: dict[str, Any]) -> Any:
    """Build ``options_cls`` from raw (text or Python) values, with errors that list valid options."""
    fields = option_fields(options_cls)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        valid = describe_options(options_cls)
        raise PipelineError(f"pass '{pass_name}' has no option {unknown[0]!r}; valid options: {valid}")
    values = {k: coerce(v, fields[k][0], f"pass '{pass_name}' option '{k}'") for k, v in raw.items()}
    missing = [k for k, (_, d) in fields.items() if d is dataclasses.MISSING and k not in values]
    if missing:
        raise PipelineError(f"pass '{pass_name}' needs option {missing[0]!r} ({describe_options(options_cls)})")
    try:
        return options_cls(**values)
    except OptionError as e:
        raise OptionError(f"pass '{pass_name}': {e}") from None
    except (ValueError, TypeError) as e:
        raise PipelineError(f"pass '{pass_name}': {e}") from None


# --- option ranges, checked in each Options dataclass's __post_init__ -------------------------------
@dataclass(frozen=True)
class Rule:
    """A predicate on one option value with the text that says what it requires."""

    test: Callable[[Any], bool]
    text: str

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except TypeError:
            return False


def at_least(lo: float) -> Rule:
    return Rule(lambda v: v >= lo, f">= {lo}")


def greater_than(lo: float) -> Rule:
    return Rule(lambda v: v > lo, f"> {lo}")


def in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
    text = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return Rule(lambda v: (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi), text)


def optional(rule: Rule) -> Rule:
    """None, or a value that satisfies ``rule``."""
    return Rule(lambda v: v is None or rule(v), f"none or {rule.text}")


def each(rule: Rule, *, nonempty: bool = False) -> Rule:
    """A list whose items all satisfy ``rule``."""
    return Rule(lambda v: (len(v) > 0 or not nonempty) and all(rule(x) for x in v),
                f"a {'non-empty ' if nonempty else ''}list, each item {rule.text}")


POSITIVE = greater_than(0)
NON_NEGATIVE = at_least(0)
POSITIVE_INT = at_least(1)
FRACTION = in_range(0, 1)


def validate(options: Any, **rules: Rule) -> None:
    """Raise `OptionError` naming the first option of ``options`` that breaks its rule. Call it from an Options
    dataclass's ``__post_init__``, so a bad value fails when the pipeline is parsed, before any tracing."""
    for name, rule in rules.items():
        value = getattr(options, name)
        if not rule(value):
            raise OptionError(f"option '{name}' must be {rule.text}, got {format_value(value)}")


def option_error(name: str, requirement: str, value: Any) -> OptionError:
    """An `OptionError` for a check `validate` cannot express (several options together)."""
    return OptionError(f"option '{name}' must be {requirement}, got {format_value(value)}")


class FunctionPass(Pass):
    """Adapter that turns ``fn(graph, ctx, *, opt=default, ...) -> bool | PassResult`` into a pass."""

    fn: ClassVar[Callable[..., Any]]

    def run(self, graph: Any, ctx: Any) -> PassResult:
        kwargs = {f.name: getattr(self.options, f.name) for f in dataclasses.fields(self.options)}
        out = type(self).fn(graph, ctx, **kwargs)
        if isinstance(out, PassResult):
            return out
        return PassResult(graph, modified=bool(out) if out is not None else True)


def options_from_signature(fn: Callable[..., Any]) -> type:
    """A frozen Options dataclass from a function's keyword-only parameters."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    specs = []
    for p in sig.parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        tp = hints.get(p.name, type(p.default) if p.default is not inspect.Parameter.empty else str)
        if p.default is inspect.Parameter.empty:
            specs.append((p.name, tp))
        else:
            specs.append((p.name, tp, field(default=p.default)))
    return dataclasses.make_dataclass(f"{fn.__name__}_Options", specs, frozen=True)
