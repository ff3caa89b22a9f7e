"""`PassContext`: what a pipeline runs with (target, config, data, instruments, cached analyses)."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from qgraph.analysis_registry import get_analysis


@dataclass
class PassContext:
    """Shared state of one pipeline run.

    ``target``: a `qgraph.targets` Target (or None); ``config``: free-form global options
    (e.g. ``{"progress": False}``); ``calibration``: an iterable of input tuples; ``instruments``:
    `PassInstrument` objects called around every pass; ``report``: where passes leave findings
    (lowering report, per-layer errors) for the user; ``artifacts``: objects passes hand to later
    passes (e.g. the fake-quant simulation graph that ``verify`` compares the lowered graph with).
    """

    target: Any = None
    config: dict[str, Any] = field(default_factory=dict)
    calibration: Iterable[Any] | None = None
    instruments: list[Any] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    artifacts: dict[str, Any] = field(default_factory=dict, repr=False)
    _analyses: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def progress(self) -> bool:
        return bool(self.config.get("progress", True))

    def analysis(self, name: str, graph: Any) -> Any:
        """The named analysis of ``graph``, computed on first use and cached until a pass invalidates it."""
        key = f"{name}@{id(graph)}"
        if key not in self._analyses:
            self._analyses[key] = get_analysis(name)(graph, self)
        return self._analyses[key]

    def cached_analyses(self) -> set[str]:
        return {k.split("@", 1)[0] for k in self._analyses}

    def invalidate(self, preserved: frozenset[str] | set[str] = frozenset()) -> None:
        """Drop every cached analysis whose name is not in ``preserved`` (``"*"`` keeps all)."""
        if "*" in preserved:
            return
        self._analyses = {k: v for k, v in self._analyses.items() if k.split("@", 1)[0] in preserved}
