"""dce: remove nodes whose results nobody uses, and the constants and submodules left orphaned."""
from __future__ import annotations

from qgraph.pass_base import Pass, PassResult
from qgraph.registry import register_pass


@register_pass("dce")
class DeadCodeElimination(Pass):
    """Erase side-effect-free nodes without users; drop constants and submodules nothing refers to."""

    def run(self, graph, ctx) -> PassResult:
        removed = graph.eliminate_dead_code()
        return PassResult(graph, modified=removed > 0, stats={"removed": removed})
