"""`GraphView`: the IR-neutral face that passes are written against.

Decision logic (matching, qparams, search) talks to this protocol only; each IR adapter
(`qgraph.ir.fx.FxGraph`, the ONNX adapter) implements mutation and execution.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch

from qgraph.ir.meta import ANNOTATION_KEY, FUSION_KEY, KERNEL_KEY, LOWERED_FROM_KEY  # noqa: F401 (re-exported)

#: Lowered kernels an adapter may implement in `GraphView.replace_with_kernel` (see `supports_kernel`).
KERNELS = ("biqgemm", "rowwise_gather")
#: Kernels of IRs without torch modules (ONNX): ``dequantize_linear`` keeps the op running on a uniform weight
#: stored as integer codes + DequantizeLinear, the exporter's form (onnxruntime fuses what it has kernels for).
GRAPH_KERNELS = ("dequantize_linear",)
#: Kernels the lowering passes build as torch modules themselves (`FxGraph.replace_with_module`): only an
#: adapter that hosts torch modules supports them.
MODULE_KERNELS = ("int8_gemm", "int8_conv", "int8_weight_only", "int4_weight_only", "dequant")


@runtime_checkable
class GraphView(Protocol):
    """Nodes in topological order with canonical (ONNX) op names, metadata, constants and edits.

    ``ir`` names the adapter family (``"fx"``: `qgraph.ir.fx.FxGraph`, from symbolic_trace or torch.export;
    ``"onnx"``: `qgraph.ir.onnx.OnnxGraph`); a pass that runs on some families only lists them in its
    ``frontends`` and `PassManager` refuses it on the others. ``frontend`` is the finer capture path
    (``"fx"``, ``"export"`` or ``"onnx"``).
    """

    ir: str
    frontend: str
    properties: set[str]
    example_inputs: tuple
    live_collect: bool

    # --- structure -----------------------------------------------------------------------------
    def nodes(self) -> list[Any]:
        """Compute nodes (no inputs/outputs/constants) in topological order."""

    def input_nodes(self) -> list[Any]:
        """The graph's (non-constant) inputs, in call order."""

    def op_type(self, node: Any) -> str:
        """Canonical op name (ONNX op_type vocabulary: Gemm, MatMul, Conv, Gather, Relu, ...)."""

    def name(self, node: Any) -> str:
        """Unique node name within the graph."""

    def qualname(self, node: Any) -> str:
        """The source-module path the node came from (e.g. ``encoder.layer.0.attention.self.query``)."""

    def inputs(self, node: Any) -> list[Any]:
        """The node's non-constant tensor inputs (values or producer nodes, per adapter), in order."""

    def producers(self, node: Any) -> list[Any | None]:
        """The compute node behind each of `inputs` (None for graph inputs)."""

    def users(self, node: Any) -> list[Any]:
        """Consumer nodes of the node's output."""

    def meta(self, node: Any) -> dict[str, Any]:
        """Mutable per-node metadata (annotations live under ``ANNOTATION_KEY``)."""

    def attribute(self, node: Any, name: str, default: Any = None) -> Any:
        """A node attribute by its ONNX name (``epsilon``, ``training_mode`` of BatchNormalization, ``transB`` of
        Gemm, ...) as a Python value, or ``default`` when the node does not have it."""

    # --- what a node computes ------------------------------------------------------------------------
    def is_linear(self, node: Any) -> bool:
        """Whether the node computes ``y = x @ Wᵀ (+ b)`` over the last dim of its first input, with ``W =
        param(node, "weight")`` a constant ``[out, in]`` matrix (nn.Linear, F.linear, aten.linear; ONNX Gemm
        and MatMul with a constant 2-D weight, which the ONNX adapter presents as ``[out, in]``)."""

    def is_embedding(self, node: Any) -> bool:
        """Whether the node is a plain row lookup ``y = W[ids]`` of a constant 2-D table ``W = param(node,
        "weight")``, ``ids`` its only tensor input (nn.Embedding without max_norm, aten.embedding, Gather
        axis 0 of a constant)."""

    def weight_layout(self, node: Any) -> str | None:
        """How ``param(node, "weight")`` is oriented: ``"nk"`` (``[out, in]``: Linear, Conv, and every Gemm /
        MatMul of the ONNX adapter), ``"kn"`` (``[in, out]``: a torch matmul / addmm right operand), None for
        anything else (batched or missing weights)."""

    # --- constants -----------------------------------------------------------------------------
    def param(self, node: Any, role: str) -> torch.Tensor | None:
        """A constant input by role (``weight``, ``bias``, ``running_mean``...), or None."""

    def set_param(self, node: Any, role: str, value: torch.Tensor) -> None:
        """Replace (or create) a constant input by role."""

    def shares_weight(self, node: Any) -> bool:
        """Whether another node reads the same stored weight (tied weights, a module called twice)."""

    # --- shapes --------------------------------------------------------------------------------
    def shape(self, node: Any) -> tuple | None:
        """Output shape from shape propagation (symbolic dims as strings), or None."""

    def dynamic_dims(self) -> list[set[int]]:
        """Per graph input, the dims that may differ from the example inputs."""

    # --- edits ---------------------------------------------------------------------------------
    def replace_all_uses(self, old: Any, new: Any) -> None: ...

    def replace_node(self, old: Any, new: Any) -> None:
        """Route every use of ``old``'s result (its first one, for ops with several) to ``new``; erase ``old``."""

    def erase(self, node: Any) -> None: ...

    def wrap_input(self, node: Any, idx: int, target: Any, extra_args: tuple = ()) -> Any:
        """Insert a per-tensor fake quantization on input ``idx`` of ``node``."""

    def wrap_output(self, node: Any, target: Any, extra_args: tuple = ()) -> Any:
        """Insert a per-tensor fake quantization on ``node``'s output, read by all its former readers."""

    def scale_input(self, nodes: list[Any], idx: int, factor: torch.Tensor) -> Any:
        """Insert ``x · factor`` (``factor`` along x's last dim) between the value feeding input ``idx`` of every
        node in ``nodes`` (all reading that one value) and those nodes; return the new node."""

    def supports_kernel(self, kernel: str) -> bool:
        """Whether this IR can run ``kernel``: one of `KERNELS` (built by `replace_with_kernel`) or of
        `MODULE_KERNELS` (torch modules a lowering pass builds)."""

    def replace_with_kernel(self, node: Any, kernel: str, qweight: Any, *, bias: torch.Tensor | None = None,
                            **options: Any) -> Any:
        """Replace ``node`` by ``kernel`` running ``qweight`` (``biqgemm``: a `BCQWeight` Linear on input 0, with
        ``bias``, option ``mode``; ``rowwise_gather``: a row-wise `UniformWeight` table looked up by input 0;
        ``dequantize_linear``, where supported: ``node`` itself, its constant weight now a `UniformWeight`'s codes
        + DequantizeLinear). The new node keeps the old one's name under ``meta[LOWERED_FROM_KEY]`` and is
        returned."""

    def eliminate_dead_code(self) -> int:
        """Remove nodes and constants nothing uses; return how many went away."""

    def recompile(self) -> None:
        """Make edits take effect for execution."""

    def copy(self) -> GraphView:
        """An independent deep copy (constants and node metadata included)."""

    # --- execution -------------------------------------------------------------------------------
    def __call__(self, *inputs: Any) -> Any:
        """Execute the graph."""

    def collect(self, requests: list[tuple[Any, int]], batches: Any, on_value: Any) -> int:
        """Run ``batches``, handing input ``idx`` of each requested ``(node, idx)`` to ``on_value(i, tensor)``;
        return the batch count. With ``live_collect`` True, ``on_value`` runs while the graph executes, so
        weights it changes affect the rest of that run; otherwise all values come after each run."""

    def node_values(self, inputs: tuple) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Run ``inputs`` once: every node's float output keyed by node name (a lowered node by the name it
        replaced, ``meta[LOWERED_FROM_KEY]``), and those names in graph order."""


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
