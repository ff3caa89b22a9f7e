"""BiQGEMM in standard ONNX ops (``portable=True``): the LUT algorithm written as MatMul, Gather, ReduceSum.

For ``x [N, K]`` cut into chunks of μ columns (each α-group padded to a multiple of μ with zero activations):

1. ``T = x_chunks @ S``, ``S [μ, 2^μ]`` with ``S[j, key] = +1`` where bit j of key is set, else −1: every
   signed sum of a chunk, once per input row (``[N, C, 2^μ]``);
2. ``Gather`` of the table laid out as ``[C·2^μ, N]`` (so each index copies a contiguous row of N values) at
   ``c·2^μ + key[i, m, c]`` → ``[q, M, C, N]``;
3. ``ReduceSum`` over the chunks of each group, ``Mul`` by ``alpha``, ``ReduceSum`` over planes and groups;
4. ``+ Σ_g z[m, g] · Σ_{k∈g} x[k]`` (a MatMul of the group sums with zᵀ) and ``+ bias``.

Keys are stored as a uint8 initializer ``[q, M, C]`` of μ-bit indices; onnxruntime folds the
``Cast`` + offset into int64 indices once at session creation. The trade-off of μ:
- μ = 8 (default): the keys take exactly the bytes of the packed bit-planes (q·M·K/8) and the Gather reads
  q·M·K/8 entries per input row; the table costs 256·K/8 = 32·K multiply-adds per row.
- μ = 4: keys take twice those bytes (one 4-bit key per byte) and the Gather reads twice as many entries, but
  the table is 4·K multiply-adds per row and 8× smaller — better only for very short rows.
The Gather output ``[q, M, C, N]`` is materialized, so memory grows with the batch: this form is for portability
(any onnxruntime, no qgraph), not speed; the ``ai.qgraph::BiQGEMM`` custom op is the fast path.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.errors import ExportError

MUS = (4, 8)


def sign_matrix(mu: int) -> np.ndarray:
    """``S [μ, 2^μ]``: column ``key`` holds ±1 by the bits of key (LSB = first column of the chunk)."""
    keys = np.arange(1 << mu)
    return np.where((keys[None, :] >> np.arange(mu)[:, None]) & 1, 1.0, -1.0).astype(np.float32)


def keys_of(planes: np.ndarray, k: int, group_size: int, mu: int) -> np.ndarray:
    """uint8 ``[q, M, C]`` μ-bit keys, each α-group padded to a multiple of μ columns (padding bits 0)."""
    q, m, _ = planes.shape
    bits = np.unpackbits(planes, axis=-1, bitorder="little")[..., :k]
    g = -(-k // group_size)
    gp = -(-group_size // mu) * mu
    padded = np.zeros((q, m, g * group_size), dtype=np.uint8)
    padded[..., :k] = bits
    grouped = np.zeros((q, m, g, gp), dtype=np.uint8)
    grouped[..., :group_size] = padded.reshape(q, m, g, group_size)
    chunks = grouped.reshape(q, m, -1, mu).astype(np.uint16)
    return (chunks << np.arange(mu, dtype=np.uint16)).sum(-1).astype(np.uint8)


class Emitter:
    """Creates nodes (kept in order, for insertion before a placeholder) and uniquely named initializers."""

    def __init__(self, graph: ir.Graph, prefix: str):
        self.graph, self.prefix = graph, prefix
        self.nodes: list[ir.Node] = []
        # Names handed out by every emitter of this graph (their nodes may not be inserted yet) and the graph's own:
        # onnxruntime refuses a model with two nodes of one name (e.g. a weight's and a bias's DequantizeLinear).
        self._taken: set[str] = graph.meta.setdefault("qgraph.emitted_node_names", set())
        self._taken.update(n.name for n in graph if n.name)

    def op(self, op_type: str, inputs, domain: str = "", **attrs) -> ir.Value:
        i = len(self.nodes)
        while f"{self.prefix}/{op_type}_{i}" in self._taken:
            i += 1
        name = f"{self.prefix}/{op_type}_{i}"
        self._taken.add(name)
        node = ir.node(op_type, list(inputs), attributes=attrs or None, domain=domain, name=name)
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, suffix: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
        name = f"{self.prefix}.{suffix}"
        i = 0
        while name in self.graph.initializers:
            i += 1
            name = f"{self.prefix}.{suffix}_{i}"
        array = np.asarray(array)  # a 0-d scale stays 0-d: onnxruntime's QDQ fusions want scalar qparams
        tensor = ir.Tensor(np.ascontiguousarray(array) if array.ndim else array, dtype=dtype, name=name)
        value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def ints(self, suffix: str, values) -> ir.Value:
        return self.const(suffix, np.asarray(values, dtype=np.int64))


def emit_biqgemm(e: Emitter, x: ir.Value, planes: np.ndarray, alpha: np.ndarray, offset: np.ndarray | None,
                 bias: np.ndarray | None, out_features: int, in_features: int, group_size: int,
                 mu: int = 8) -> ir.Value:
    """Nodes computing ``x @ Ŵᵀ (+ bias)`` for the BCQ code (planes, alpha, offset); returns the output value."""
    if mu not in MUS:
        raise ExportError(f"portable BiQGEMM supports mu in {MUS}, got {mu}")
    q, m, k, gs = alpha.shape[0], out_features, in_features, group_size
    g = -(-k // gs)
    gp = -(-gs // mu) * mu
    cp = gp // mu
    c = g * cp
    keys = keys_of(planes, k, gs, mu)
    x2 = e.op("Reshape", [x, e.ints("shape_in", [-1, k])])
    if g * gs != k:
        x2 = e.op("Pad", [x2, e.ints("pad_k", [0, 0, 0, g * gs - k])])
    if gp != gs:
        x3 = e.op("Reshape", [x2, e.ints("shape_groups", [-1, g, gs])])
        x3 = e.op("Pad", [x3, e.ints("pad_groups", [0, 0, 0, 0, 0, gp - gs])])
        chunks = e.op("Reshape", [x3, e.ints("shape_chunks", [-1, c, mu])])
    else:
        chunks = e.op("Reshape", [x2, e.ints("shape_chunks", [-1, c, mu])])
    table = e.op("MatMul", [chunks, e.const("signs", sign_matrix(mu))])  # [N, C, 2^mu]
    # Keyed rows of N values: each Gather index copies a contiguous row (fast for large N).
    rows = e.op("Reshape", [e.op("Transpose", [table], perm=[1, 2, 0]), e.ints("shape_rows", [c << mu, -1])])
    idx = e.op("Add", [e.op("Cast", [e.const("keys", keys)], to=ir.DataType.INT64),
                       e.ints("key_offsets", np.arange(c, dtype=np.int64) << mu)])
    picked = e.op("Gather", [rows, idx], axis=0)  # [q, M, C, N]
    picked = e.op("Reshape", [picked, e.ints("shape_picked", [q, m, g, cp, -1])])
    picked = e.op("ReduceSum", [picked, e.ints("axis_chunks", [3])], keepdims=0)  # [q, M, G, N]
    y = e.op("Mul", [picked, e.const("alpha", alpha.astype(np.float32)[..., None])])
    y = e.op("Transpose", [e.op("ReduceSum", [y, e.ints("axes_planes_groups", [0, 2])], keepdims=0)],
             perm=[1, 0])  # [N, M]
    if offset is not None:
        sums = e.op("ReduceSum", [e.op("Reshape", [x2, e.ints("shape_zgroups", [-1, g, gs])]),
                                  e.ints("axis_group", [-1])], keepdims=0)
        y = e.op("Add", [y, e.op("MatMul", [sums, e.const("offset_t", offset.astype(np.float32).T)])])
    if bias is not None:
        y = e.op("Add", [y, e.const("bias", bias.astype(np.float32))])
    lead = e.op("Shape", [x], end=-1)
    shape = e.op("Concat", [lead, e.ints("out_features", [m])], axis=0)
    return e.op("Reshape", [y, shape])
