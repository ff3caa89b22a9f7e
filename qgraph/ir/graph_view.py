"""`GraphView`: the IR-neutral face that passes are written against.

Decision logic (matching, qparams, search) talks to this protocol only; each IR adapter
(`qgraph.ir.fx.FxGraph`, the ONNX adapter) implements mutation and execution.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch

ANNOTATION_KEY = "qgraph.annotation"
FUSION_KEY = "qgraph.fusion"


@runtime_checkable
class GraphView(Protocol):
    """Nodes in topological order with canonical (ONNX) op names, metadata, constants and edits."""

    frontend: str
    properties: set[str]

    def nodes(self) -> list[Any]:
        """Compute nodes (no inputs/outputs/constants) in topological order."""

    def op_type(self, node: Any) -> str:
        """Canonical op name (ONNX op_type vocabulary: Gemm, MatMul, Conv, Gather, Relu, ...)."""

    def name(self, node: Any) -> str:
        """Unique node name within the graph."""

    def qualname(self, node: Any) -> str:
        """The source-module path the node came from (e.g. ``encoder.layer.0.attention.self.query``)."""

    def inputs(self, node: Any) -> list[Any]:
        """Producer nodes of the node's tensor inputs, in order."""

    def users(self, node: Any) -> list[Any]:
        """Consumer nodes of the node's output."""

    def meta(self, node: Any) -> dict[str, Any]:
        """Mutable per-node metadata (annotations live under ``ANNOTATION_KEY``)."""

    def param(self, node: Any, role: str) -> torch.Tensor | None:
        """A constant input by role (``weight``, ``bias``, ``running_mean``...), or None."""

    def set_param(self, node: Any, role: str, value: torch.Tensor) -> None:
        """Replace (or create) a constant input by role."""

    def shape(self, node: Any) -> tuple | None:
        """Output shape from shape propagation (symbolic dims as strings), or None."""

    def replace_all_uses(self, old: Any, new: Any) -> None: ...

    def erase(self, node: Any) -> None: ...

    def __call__(self, *inputs: Any) -> Any:
        """Execute the graph."""


def weighted_nodes(graph: GraphView, op_types: Iterable[str] | None = None) -> list[Any]:
    """Nodes of weighted ops (Gemm, MatMul, Conv, Gather by default) whose weight is a constant."""
    from qgraph.ir.ops import WEIGHTED_OPS

    wanted = set(op_types) if op_types is not None else WEIGHTED_OPS
    out = []
    for node in graph.nodes():
        if graph.op_type(node) not in wanted:
            continue
        if graph.param(node, "weight") is not None:
            out.append(node)
    return out
