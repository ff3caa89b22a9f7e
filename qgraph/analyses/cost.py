"""Roofline cost model: predicted bytes, MACs and latency per node and for the whole graph.

latency(node) = max(bytes / bandwidth, work / throughput) + per-call overhead, where work is MACs
at the rate of the kernel's arithmetic (fp32, int8, fp16...) or, for BiQGEMM, table lookups
(tokens · M · ⌈K/μ⌉ · q) at the target's LUT rate. Weight bytes follow the annotated quantization.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from qgraph.ir.graph_view import ANNOTATION_KEY
from qgraph.quant.qspec import QSpec
from qgraph.registry import register_analysis

_FREE_OPS = frozenset({"Reshape", "Transpose", "Identity", "Shape", "GetItem", "Dropout", "Flatten", "Squeeze",
                       "Unsqueeze", "Expand", "Slice", "Cast"})
LUT_MU = {"gpu": 8, "cpu": 4}


@dataclass(frozen=True)
class NodeCost:
    name: str
    op: str
    kernel: str
    macs: int
    weight_bytes: int
    activation_bytes: int
    compute_us: float
    memory_us: float
    latency_us: float

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes


@dataclass(frozen=True)
class CostReport:
    target: str
    nodes: list[NodeCost] = field(default_factory=list)

    @property
    def latency_us(self) -> float:
        return sum(n.latency_us for n in self.nodes)

    @property
    def weight_bytes(self) -> int:
        return sum(n.weight_bytes for n in self.nodes)

    def by_name(self) -> dict[str, NodeCost]:
        return {n.name: n for n in self.nodes}

    def table(self, top: int | None = None) -> str:
        rows = sorted(self.nodes, key=lambda n: -n.latency_us)[:top]
        lines = ["| node | op | kernel | MACs | weight bytes | predicted µs |", "|---|---|---|---:|---:|---:|"]
        lines += [f"| {n.name} | {n.op} | {n.kernel} | {n.macs:,} | {n.weight_bytes:,} | {n.latency_us:.1f} |"
                  for n in rows]
        lines.append(f"| **total** | | | | {self.weight_bytes:,} | {self.latency_us:.1f} |")
        return "\n".join(lines)


def weight_bytes(numel: int, rows: int, spec: QSpec | None) -> int:
    """Stored bytes of a weight with ``numel`` elements and ``rows`` output rows under ``spec``."""
    if spec is None:
        return numel * 4
    cols = numel // max(rows, 1)
    if spec.scheme == "bcq":
        groups = rows * (math.ceil(cols / spec.group_size) if spec.granularity == "group" else 1)
        return math.ceil(numel * spec.bits / 8) + groups * 4 * (spec.bits + int(spec.bcq_offset))
    scales = {"tensor": 1, "channel": rows,
              "group": rows * math.ceil(cols / (spec.group_size or cols))}[spec.granularity]
    return math.ceil(numel * spec.bits / 8) + scales * (4 + (0 if spec.symmetric else 1))


def _numel(shape: tuple | None) -> int:
    return int(math.prod(shape)) if shape else 0


def _concrete_shapes(graph: Any) -> dict[Any, tuple]:
    """Output shapes at the example inputs (symbolic dims resolved by one run)."""
    graph.propagate_shapes()
    out = {}
    for node in graph.nodes():
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            out[node] = tuple(int(d) for d in tm.shape)
    return out


def estimate_cost(graph: Any, target: Any) -> CostReport:
    """Predicted cost of every compute node of ``graph`` on ``target``."""
    shapes = _concrete_shapes(graph)
    c = target.cost
    device = "gpu" if target.name.startswith("gpu") else "cpu"
    bandwidth = c.memory_bandwidth_gbps * 1e9
    nodes = []
    for node in graph.nodes():
        op = graph.op_type(node)
        out_shape = shapes.get(node)
        ann = graph.meta(node).get(ANNOTATION_KEY)
        wspec = ann.weight if ann is not None else None
        aspec = ann.inputs.get(0) if ann is not None else None
        kernel = target.kernel_for(op, wspec, aspec) or "float"
        w = graph.param(node, "weight")
        in_shapes = [shapes.get(i) for i in graph.inputs(node)]
        act_elems = _numel(out_shape) + sum(_numel(s) for s in in_shapes if s)
        act_bytes = act_elems * (1 if aspec is not None else 4)
        macs, wbytes, work_us = 0, 0, 0.0
        if w is not None and op in ("Gemm", "MatMul", "Conv"):
            rows = w.shape[0]
            wbytes = weight_bytes(w.numel(), rows, wspec)
            per_out = w.numel() // rows
            macs = _numel(out_shape) * per_out  # Gemm: tokens·M·K; Conv: out elements·(Cin/g)·kh·kw
            if kernel == "biqgemm" and wspec is not None:
                mu = LUT_MU[device]
                tokens = _numel(out_shape) // rows if out_shape else 1
                lookups = tokens * rows * math.ceil(per_out / mu) * wspec.bits
                work_us = lookups / c.lut_lookups_per_second * 1e6
            else:
                rate = c.macs_per_second.get("int8" if kernel in ("int8_gemm", "int8_conv") else
                                             "fp16" if device == "gpu" else "fp32", c.macs_per_second["fp32"])
                work_us = macs / rate * 1e6
        elif w is not None and op == "Gather":
            rows = w.shape[0]
            wbytes = 0  # a gather reads only the looked-up rows: counted in activation bytes
            act_bytes += _numel(out_shape) * (wspec.bits / 8 if wspec is not None else 4)
        elif op in _FREE_OPS:
            act_bytes = 0
        else:
            work_us = act_elems / c.macs_per_second["fp32"] * 1e6
        memory_us = (wbytes + act_bytes) / bandwidth * 1e6
        overhead = c.call_overhead_us if op not in _FREE_OPS else 0.0
        nodes.append(NodeCost(graph.name(node), op, kernel, int(macs), int(wbytes), int(act_bytes), work_us,
                              memory_us, max(work_us, memory_us) + overhead))
    return CostReport(target.name, nodes)


@register_analysis("cost")
def cost_analysis(graph: Any, ctx: Any) -> CostReport:
    from qgraph.target import load_target

    target = ctx.target if ctx.target is not None else load_target("generic")
    return estimate_cost(graph, load_target(target) if isinstance(target, str) else target)


