"""lower-embedding: Gather nodes with a row-wise uniform weight become a row-wise quantized gather."""
from __future__ import annotations

from qgraph.ir.meta import QWEIGHT_KEY
from qgraph.lowering import record, snapshot_simulation
from qgraph.pass_base import Pass, PassResult
from qgraph.quant.qtensor import UniformWeight
from qgraph.registry import register_pass


@register_pass("lower-embedding", after=("quantize-weights", "insert-fq"), requires=("weights-quantized",),
               ensures=("lowered",))
class LowerEmbedding(Pass):
    def run(self, graph, ctx) -> PassResult:
        snapshot_simulation(graph, ctx)
        lowered = 0
        for node in list(graph.nodes()):
            q = graph.meta(node).get(QWEIGHT_KEY)
            if graph.op_type(node) != "Gather" or not isinstance(q, UniformWeight):
                continue
            name = graph.qualname(node)
            spec = q.spec
            if spec.granularity != "channel" or spec.axis != 0 or not graph.is_embedding(node):
                record(ctx, name, "Gather", "float", "float",
                       f"row-wise gather needs per-row (channel, axis 0) codes of a plain embedding; got {spec}")
                continue
            if not graph.supports_kernel("rowwise_gather"):
                record(ctx, name, "Gather", "float", "float", f"the {graph.ir} adapter has no row-wise gather")
                continue
            graph.replace_with_kernel(node, "rowwise_gather", q)
            record(ctx, name, "Gather", f"int{spec.bits}_gather", "lowered", f"{spec.bits}-bit rows")
            lowered += 1
        if lowered:
            graph.recompile()
        return PassResult(graph, modified=lowered > 0, stats={"lowered": lowered})
