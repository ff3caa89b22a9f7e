"""dce: remove nodes whose results nobody uses, and the constants and submodules left orphaned."""
from __future__ import annotations

from qgraph.pass_base import Pass, PassResult
from qgraph.registry import register_pass

_KEEP_MODULES = ("_guards_fn",)


@register_pass("dce")
class DeadCodeElimination(Pass):
    """Erase side-effect-free nodes without users; drop submodules and constants nothing refers to."""

    def run(self, graph, ctx) -> PassResult:
        gm = graph.gm
        before = len(gm.graph.nodes)

        def impure(node) -> bool:
            if node.op == "call_module" and node.target in _KEEP_MODULES:
                return True
            return node.is_impure()

        gm.graph.eliminate_dead_code(is_impure_node=impure)
        removed = before - len(gm.graph.nodes)
        tensors_before = _stored_tensors(gm)
        gm.delete_all_unused_submodules()
        _drop_unreferenced_root_tensors(gm)
        freed = tensors_before - _stored_tensors(gm)
        if removed or freed:
            graph.recompile()
        return PassResult(graph, modified=bool(removed or freed), stats={"removed": removed, "freed_tensors": freed})


def _stored_tensors(gm) -> int:
    return sum(1 for _ in gm.parameters()) + sum(1 for _ in gm.buffers())


def _drop_unreferenced_root_tensors(gm) -> None:
    used = {str(n.target).split(".")[0] for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for name in list(gm._parameters):
        if name not in used:
            del gm._parameters[name]
    for name in list(gm._buffers):
        if name not in used:
            del gm._buffers[name]
