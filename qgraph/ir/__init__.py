"""The IR: `GraphView` protocol, the torch.fx adapter, frontends and the printer."""
from qgraph.ir.fx import FxGraph
from qgraph.ir.graph_view import ANNOTATION_KEY, FUSION_KEY, GraphView, weighted_nodes
from qgraph.ir.printer import format_graph
from qgraph.ir.trace import trace

__all__ = ["ANNOTATION_KEY", "FUSION_KEY", "FxGraph", "GraphView", "format_graph", "trace", "weighted_nodes"]
