"""lower-embedding: Gather nodes with a row-wise uniform weight become a row-wise quantized gather."""
from __future__ import annotations

from qgraph.lowering import LOWERED_FROM_KEY, record, snapshot_simulation
from qgraph.pass_base import Pass, PassResult
from qgraph.passes.quantize_weights import QWEIGHT_KEY
from qgraph.quant.qtensor import UniformWeight
from qgraph.registry import register_pass


@register_pass("lower-embedding", after=("quantize-weights", "insert-fq"), requires=("weights-quantized",),
               ensures=("lowered",))
class LowerEmbedding(Pass):
    def run(self, graph, ctx) -> PassResult:
        from qgraph.kernels.embedding import RowwiseQuantizedEmbedding

        snapshot_simulation(graph, ctx)
        lowered = 0
        for node in list(graph.nodes()):
            q = graph.meta(node).get(QWEIGHT_KEY)
            if graph.op_type(node) != "Gather" or not isinstance(q, UniformWeight):
                continue
            name = graph.qualname(node)
            spec = q.spec
            if spec.granularity != "channel" or spec.axis != 0 or not _plain_embedding(graph, node):
                record(ctx, name, "Gather", "float", "float",
                       f"row-wise gather needs per-row (channel, axis 0) codes of a plain embedding; got {spec}")
                continue
            module = RowwiseQuantizedEmbedding(q.codes, q.scale, q.zero_point.to(q.scale.dtype), spec.bits)
            ids = graph.inputs(node)[0]
            new = graph.replace_with_module(node, module, f"{graph.name(node)}_rowwise", inputs=[ids])
            graph.meta(new)[LOWERED_FROM_KEY] = graph.name(node)
            record(ctx, name, "Gather", f"int{spec.bits}_gather", "lowered", f"{spec.bits}-bit rows")
            lowered += 1
        if lowered:
            graph.recompile()
        return PassResult(graph, modified=lowered > 0, stats={"lowered": lowered})


def _plain_embedding(graph, node) -> bool:
    """An nn.Embedding module or aten.embedding without max_norm (the only form lowered)."""
    if node.op == "call_module":
        mod = graph.module_of(node)
        return getattr(mod, "max_norm", None) is None
    return node.op == "call_function" and "embedding" in str(node.target) and len(graph.inputs(node)) == 1
