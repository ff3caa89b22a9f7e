"""Graph analyses (lazily computed through ``PassContext.analysis``): cost model, latency profile."""
from qgraph.analyses.cost import CostReport, NodeCost, estimate_cost
from qgraph.analyses.profile import measure_node_latency

__all__ = ["CostReport", "NodeCost", "estimate_cost", "measure_node_latency"]
