"""dce: remove nodes whose results nobody uses, and the constants and submodules left orphaned."""
from __future__ import annotations

from qgraph.pass_base import Pass, PassResult
from qgraph.registry import register_pass

_KEEP_MODULES = ("_guards_fn",)


@register_pass("dce")
class DeadCodeElimination(Pass):
    """Erase side-effect-free nodes without users; drop unused submodules."""

    def run(self, graph, ctx) -> PassResult:
        gm = graph.gm
        before = len(gm.graph.nodes)

        def impure(node) -> bool:
            if node.op == "call_module" and node.target in _KEEP_MODULES:
                return True
            return node.is_impure()

        gm.graph.eliminate_dead_code(is_impure_node=impure)
        removed = before - len(gm.graph.nodes)
        if removed:
            gm.delete_all_unused_submodules()
            graph.recompile()
        return PassResult(graph, modified=removed > 0, stats={"removed": removed})
