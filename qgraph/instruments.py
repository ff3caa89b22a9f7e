"""Pass instruments: hooks around every pass (timing, IR dumps, verification)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from qgraph.errors import PipelineError


class PassInstrument:
    """Override any of the hooks; the pass manager calls them around each pass."""

    def before_pipeline(self, graph: Any, ctx: Any) -> None: ...

    def before_pass(self, pass_: Any, graph: Any, ctx: Any) -> None: ...

    def after_pass(self, pass_: Any, graph: Any, ctx: Any, result: Any) -> None: ...

    def after_pipeline(self, graph: Any, ctx: Any) -> None: ...


class TimingInstrument(PassInstrument):
    """Wall time per pass, in run order."""

    def __init__(self) -> None:
        self.timings: list[tuple[str, float]] = []
        self._start = 0.0

    def before_pass(self, pass_: Any, graph: Any, ctx: Any) -> None:
        self._start = time.perf_counter()

    def after_pass(self, pass_: Any, graph: Any, ctx: Any, result: Any) -> None:
        self.timings.append((str(pass_), time.perf_counter() - self._start))

    def summary(self) -> str:
        total = sum(t for _, t in self.timings) or 1e-12
        rows = [f"{name:<40} {t * 1e3:9.1f} ms {100 * t / total:5.1f}%" for name, t in self.timings]
        return "\n".join(rows + [f"{'total':<40} {total * 1e3:9.1f} ms"])


class DumpIRInstrument(PassInstrument):
    """Writes the printed graph before the pipeline and after each pass into ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.count = 0

    def _dump(self, label: str, graph: Any) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.count:02d}-{label}.txt"
        path.write_text(str(graph) + "\n")
        self.count += 1

    def before_pipeline(self, graph: Any, ctx: Any) -> None:
        self._dump("input", graph)

    def after_pass(self, pass_: Any, graph: Any, ctx: Any, result: Any) -> None:
        self._dump(pass_.name, result.graph)


class VerifyInstrument(PassInstrument):
    """After each pass that changed the graph: lint it, run it, and check outputs keep their shapes
    and stay finite. A failure names the pass that broke the graph."""

    def __init__(self, inputs: tuple | None = None) -> None:
        self.inputs = inputs
        self._reference_shapes: list[tuple] | None = None

    def _run(self, graph: Any) -> list[torch.Tensor]:
        inputs = self.inputs if self.inputs is not None else getattr(graph, "example_inputs", ())
        with torch.no_grad():
            out = graph(*inputs)
        leaves, _ = torch.utils._pytree.tree_flatten(out)
        return [t for t in leaves if isinstance(t, torch.Tensor)]

    def before_pipeline(self, graph: Any, ctx: Any) -> None:
        self._reference_shapes = [tuple(t.shape) for t in self._run(graph)]

    def after_pass(self, pass_: Any, graph: Any, ctx: Any, result: Any) -> None:
        if not result.modified:
            return
        g = result.graph
        try:
            if hasattr(g, "graph") and hasattr(g.graph, "lint"):
                g.graph.lint()
            outs = self._run(g)
        except Exception as e:
            raise PipelineError(f"verify: after pass '{pass_}' the graph no longer runs: {e}") from None
        shapes = [tuple(t.shape) for t in outs]
        if self._reference_shapes is not None and shapes != self._reference_shapes:
            raise PipelineError(
                f"verify: pass '{pass_}' changed the output shapes from {self._reference_shapes} to {shapes}"
            )
        bad = [i for i, t in enumerate(outs) if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise PipelineError(f"verify: after pass '{pass_}' output {bad[0]} has NaN/inf values")
