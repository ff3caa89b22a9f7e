"""Name → pass registry (the name → analysis one is `qgraph.analysis_registry`, re-exported here)."""
from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from qgraph.analysis_registry import get_analysis, load_builtins, register_analysis
from qgraph.errors import PipelineError
from qgraph.pass_base import FunctionPass, Pass, options_from_signature

__all__ = ["get_analysis", "get_pass", "register_analysis", "register_pass", "registered_passes", "unregister_pass"]

_PASSES: dict[str, type[Pass]] = {}


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


def get_pass(name: str) -> type[Pass]:
    load_builtins()
    if name not in _PASSES:
        close = difflib.get_close_matches(name, list(_PASSES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise PipelineError(f"unknown pass {name!r}{hint}; registered passes: {', '.join(sorted(_PASSES))}")
    return _PASSES[name]


def registered_passes() -> dict[str, type[Pass]]:
    load_builtins()
    return dict(sorted(_PASSES.items()))


def unregister_pass(name: str) -> None:
    _PASSES.pop(name, None)
