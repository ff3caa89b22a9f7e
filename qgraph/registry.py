"""Name → pass and name → analysis registries."""
from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any

from qgraph.errors import PipelineError
from qgraph.pass_base import FunctionPass, Pass, options_from_signature

_PASSES: dict[str, type[Pass]] = {}
_ANALYSES: dict[str, Callable[[Any, Any], Any]] = {}
_BUILTINS_LOADED = False


def register_pass(
    name: str,
    *,
    after: tuple[str, ...] = (),
    before: tuple[str, ...] = (),
    requires: tuple[str, ...] = (),
    ensures: tuple[str, ...] = (),
    replace: bool = False,
) -> Callable[[Any], Any]:
    """Register a `Pass` subclass or a function ``fn(graph, ctx, *, options...)`` under a kebab-case name."""
    if not name or name != name.lower() or " " in name or "," in name or "{" in name:
        raise PipelineError(f"pass names are lower-case kebab-case words, got {name!r}")

    def decorate(obj: Any) -> Any:
        if isinstance(obj, type) and issubclass(obj, Pass):
            cls = obj
        elif callable(obj):
            cls = type(
                _class_name(name),
                (FunctionPass,),
                {"fn": staticmethod(obj), "Options": options_from_signature(obj), "__doc__": obj.__doc__},
            )
        else:
            raise PipelineError(f"register_pass({name!r}) decorates a Pass subclass or a function")
        if name in _PASSES and not replace and _PASSES[name] is not cls:
            raise PipelineError(f"a pass named {name!r} is already registered; pick another name or replace=True")
        cls.name = name
        cls.after = tuple(cls.after) + tuple(after)
        cls.before = tuple(cls.before) + tuple(before)
        cls.requires_properties = frozenset(cls.requires_properties) | frozenset(requires)
        cls.ensures_properties = frozenset(cls.ensures_properties) | frozenset(ensures)
        _PASSES[name] = cls
        return obj

    return decorate


def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("-")) + "Pass"


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        importlib.import_module("qgraph.passes")


def get_pass(name: str) -> type[Pass]:
    _load_builtins()
    if name not in _PASSES:
        close = difflib.get_close_matches(name, list(_PASSES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise PipelineError(f"unknown pass {name!r}{hint}; registered passes: {', '.join(sorted(_PASSES))}")
    return _PASSES[name]


def registered_passes() -> dict[str, type[Pass]]:
    _load_builtins()
    return dict(sorted(_PASSES.items()))


def unregister_pass(name: str) -> None:
    _PASSES.pop(name, None)


def register_analysis(name: str) -> Callable[[Callable[[Any, Any], Any]], Callable[[Any, Any], Any]]:
    """Register ``fn(graph, ctx) -> value`` as a lazily computed, cached analysis."""

    def decorate(fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        _ANALYSES[name] = fn
        return fn

    return decorate


def get_analysis(name: str) -> Callable[[Any, Any], Any]:
    _load_builtins()
    if name not in _ANALYSES:
        raise PipelineError(f"unknown analysis {name!r}; registered: {', '.join(sorted(_ANALYSES))}")
    return _ANALYSES[name]
