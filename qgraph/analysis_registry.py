"""Name → analysis registry (``fn(graph, ctx) -> value``, computed lazily and cached by `PassContext`), and the
loading of the built-in passes and analyses. It imports no other qgraph module (the built-ins are loaded by name
on first lookup), so `qgraph.context` and `qgraph.registry` can both sit above it without a cycle."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from qgraph.errors import PipelineError

_ANALYSES: dict[str, Callable[[Any, Any], Any]] = {}
_BUILTINS_LOADED = False


def load_builtins() -> None:
    """Import ``qgraph.passes`` once, which registers the built-in passes and the analyses they use."""
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        importlib.import_module("qgraph.passes")


def register_analysis(name: str) -> Callable[[Callable[[Any, Any], Any]], Callable[[Any, Any], Any]]:
    """Register ``fn(graph, ctx) -> value`` as a lazily computed, cached analysis."""

    def decorate(fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        _ANALYSES[name] = fn
        return fn

    return decorate


def get_analysis(name: str) -> Callable[[Any, Any], Any]:
    load_builtins()
    if name not in _ANALYSES:
        raise PipelineError(f"unknown analysis {name!r}; registered: {', '.join(sorted(_ANALYSES))}")
    return _ANALYSES[name]
