"""Per-layer int8 vs float latency in onnxruntime, measured on an exported QDQ file.

The QDQ file runs as onnxruntime fuses it (``QLinearConv``, ``QGemm``, ``MatMulIntegerToFloat``...); its float
twin is the same file with every Q/DQ pair bypassed and every weight dequantized to float under its own name, so
onnxruntime runs those layers as ``FusedConv`` / ``Gemm`` / ``MatMul``. Both run under onnxruntime's profiler on
the same inputs; a layer's time is the median kernel time of the node that reads its weight. A layer whose int8
kernel is slower than its float one is the one to keep float (``qgraph lower --runtime onnxruntime`` does that).
The kernels are timed in place, inside the whole model, so each sees the cache state it has there; the Q/DQ
and layout conversions at an int8 / float border are not charged to any layer.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch

from qgraph.errors import ExportError

WEIGHT_SUFFIX = ".weight"


@dataclass(frozen=True)
class LayerLatency:
    """One layer's kernel in both forms: op types and median µs per run."""

    layer: str
    int8_op: str
    int8_us: float
    float_op: str
    float_us: float

    def __post_init__(self):
        if not (self.int8_us >= 0 and self.float_us >= 0):
            raise ExportError(f"{self.layer}: kernel times must be >= 0 µs, got {self.int8_us}, {self.float_us}")

    @property
    def int8_slower(self) -> bool:
        return self.int8_us > self.float_us

    def as_dict(self) -> dict:
        return {"layer": self.layer, "int8_op": self.int8_op, "int8_us": round(self.int8_us, 1),
                "float_op": self.float_op, "float_us": round(self.float_us, 1), "int8_slower": self.int8_slower}


def _dequantized(dq: ir.Node) -> np.ndarray | None:
    """The float value of a DequantizeLinear of constant codes (per tensor or per axis), else None."""
    codes, scale = dq.inputs[0], dq.inputs[1]
    zp = dq.inputs[2] if len(dq.inputs) > 2 else None
    if codes is None or codes.const_value is None or scale is None or scale.const_value is None:
        return None
    if "block_size" in dq.attributes:
        return None
    c = codes.const_value.numpy().astype(np.float64)
    s = scale.const_value.numpy().astype(np.float64)
    z = zp.const_value.numpy().astype(np.float64) if zp is not None and zp.const_value is not None else 0.0
    if np.ndim(s) == 1 and s.size > 1:
        axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
        shape = [1] * c.ndim
        shape[axis % c.ndim] = -1
        s = s.reshape(shape)
        z = np.reshape(z, shape) if np.ndim(z) == 1 else z
    return ((c - z) * s).astype(np.float32)


def float_twin(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write ``src`` with every Q→DQ pair bypassed and every weight / bias DQ folded into a float initializer
    named like its codes (the layer's weight name), so onnxruntime runs the same layers in float."""
    model = ir.load(str(src))
    graph = model.graph
    for node in list(graph):
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        producer = node.inputs[0].producer() if node.inputs[0] is not None else None
        if producer is not None and producer.op_type == "QuantizeLinear" and producer.domain in ("", "ai.onnx"):
            replacement = producer.inputs[0]
        else:
            value = _dequantized(node)
            if value is None:
                continue
            replacement = ir.Value(name=f"{node.inputs[0].name}_float", const_value=ir.tensor(value))
            graph.register_initializer(replacement)
        ir.convenience.replace_all_uses_with(node.outputs[0], replacement, replace_graph_outputs=True)
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    ir.save(model, str(dst))
    return Path(dst)


def _weight_names(path: str | os.PathLike) -> set[str]:
    """The names of the constants behind each weight DQ of a QDQ file (``<layer>.weight`` from qgraph's export)."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and n.input[0].endswith(WEIGHT_SUFFIX)}


def _fingerprint(values: np.ndarray) -> tuple:
    """What survives onnxruntime's weight re-layouts (NCHWc reorders and zero-pads a float conv weight under a
    new name): the count of nonzeros, the sum of magnitudes and of squares."""
    v = values.astype(np.float64).ravel()
    return int(np.count_nonzero(v)), f"{np.abs(v).sum():.6g}", f"{np.square(v).sum():.6g}"


def _layer_keys(path: str | os.PathLike, weights: set[str]) -> dict[object, str]:
    """Weight name and float-value fingerprint → layer, for the weights named in ``weights``."""
    model = onnx.load(str(path), load_external_data=False)
    keys: dict[object, str] = {}
    for t in model.graph.initializer:
        base = t.name[:-len("_float")] if t.name.endswith("_float") else t.name
        if base in weights:
            layer = base[:-len(WEIGHT_SUFFIX)]
            keys[t.name] = layer
            if t.data_type == onnx.TensorProto.FLOAT:
                keys[_fingerprint(onnx.numpy_helper.to_array(t))] = layer
    return keys


def kernel_times(path: str | os.PathLike, inputs: Sequence[torch.Tensor], weights: set[str], *, rounds: int = 30,
                 threads: int | None = None, custom_ops: bool = True) -> dict[str, tuple[str, float]]:
    """Profile ``path`` in onnxruntime (all graph optimizations) on ``inputs``: layer → (op type, median kernel
    µs per run) of the optimized node that reads each weight in ``weights`` (or its float twin)."""
    import onnxruntime as ort

    from qgraph.export.ort_ops import session_options

    keys = _layer_keys(path, weights)
    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(custom_ops=custom_ops)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = int(threads or torch.get_num_threads())
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feeds = {i.name: t.detach().cpu().contiguous().numpy() for i, t in zip(sess.get_inputs(), inputs)}
        for _ in range(rounds + 2):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
        optimized = onnx.load(so.optimized_model_filepath, load_external_data=False)
    inits = {t.name: t for t in optimized.graph.initializer}
    layer_of = {}
    for node in optimized.graph.node:
        for name in node.input:
            layer = keys.get(name)
            if layer is None and name in inits and inits[name].data_type == onnx.TensorProto.FLOAT:
                layer = keys.get(_fingerprint(onnx.numpy_helper.to_array(inits[name])))
            if layer is not None:
                layer_of[node.name] = (layer, node.op_type)
                break
    per_run: dict[str, list[float]] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") == "Node" and name.endswith("_kernel_time") and name[:-len("_kernel_time")] in layer_of:
            per_run.setdefault(name[:-len("_kernel_time")], []).append(float(e["dur"]))
    out = {}
    for node_name, durs in per_run.items():
        layer, op = layer_of[node_name]
        out[layer] = (op, statistics.median(durs[2:] or durs))  # the first runs allocate and pack weights
    return out


def compare_layers(qdq_path: str | os.PathLike, inputs: Sequence[torch.Tensor], *, rounds: int = 30,
                   threads: int | None = None) -> list[LayerLatency]:
    """Each layer of a QDQ file with an int8 kernel, timed as int8 and as float in onnxruntime, in graph order."""
    weights = _weight_names(qdq_path)
    if not weights:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        twin = float_twin(qdq_path, Path(tmp) / "float.onnx")
        fp = kernel_times(twin, inputs, weights, rounds=rounds, threads=threads)
    q = kernel_times(qdq_path, inputs, weights, rounds=rounds, threads=threads)
    int8_ops = {"QLinearConv", "QGemm", "MatMulIntegerToFloat", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                "DynamicQuantizeMatMul", "MatMulNBits"}
    return [LayerLatency(layer, op, us, fp[layer][0], fp[layer][1]) for layer, (op, us) in q.items()
            if op in int8_ops and layer in fp]


def interleaved_ms(models: Sequence, inputs: Sequence[torch.Tensor], *, rounds: int = 15) -> list[float]:
    """Median ms per call of each model on ``inputs``, timed in interleaved rounds after one warm-up call."""
    from qgraph.execution import interleaved_seconds, medians_ms

    med = medians_ms(interleaved_seconds(dict(enumerate(models)), tuple(inputs), rounds=rounds, warmup=1))
    return [med[i] for i in range(len(models))]
