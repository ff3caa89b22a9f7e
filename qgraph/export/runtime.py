"""onnxruntime as a deployment route: a quantized model exported to ONNX and run by an onnxruntime session.

`onnxruntime_model` exports a `QuantizedModel` (QDQ + ``ai.qgraph::BiQGEMM``, see `export_onnx`) and opens it with
all of onnxruntime's graph optimizations on. It also writes the graph onnxruntime actually runs and counts its
op types, so a caller can check that QDQ pairs were fused into int8 kernels (``QLinearConv``,
``MatMulIntegerToFloat``, ``MatMulNBits``...) rather than left as DequantizeLinear → float op → QuantizeLinear.
"""
from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qgraph.errors import ExportError

FUSED_INT8_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "MatMulNBits", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QAttention", "GatherBlockQuantized",
})
UNFUSED_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


class OrtModel(nn.Module):
    """A session-backed model: call it with torch tensors like the model it was exported from."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, custom_ops: bool = True,
                 spinning: bool = True):
        super().__init__()
        import onnx
        import onnxruntime as ort

        from qgraph.export.ort_ops import session_options

        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path} does not exist: export the model first (qgraph.export_onnx)")
        so = session_options(custom_ops=custom_ops)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = int(threads or torch.get_num_threads())
        if not spinning:  # spin-waiting workers stall whatever runs next in this process (torch, another session)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        with tempfile.TemporaryDirectory() as tmp:
            so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            try:
                self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise ExportError(f"onnxruntime cannot open {self.path}: {first}") from None
            optimized = onnx.load(so.optimized_model_filepath, load_external_data=False)
        self.optimized_ops = collections.Counter(n.op_type for n in optimized.graph.node)
        self.inputs = [(i.name, i.type) for i in self.session.get_inputs()]

    @property
    def fused_int8_ops(self) -> int:
        """Nodes of the optimized graph that run an integer kernel."""
        return sum(c for op, c in self.optimized_ops.items() if op in FUSED_INT8_OPS)

    @property
    def unfused_qdq_ops(self) -> int:
        """QuantizeLinear / DequantizeLinear nodes left in the optimized graph (float math between them)."""
        return sum(c for op, c in self.optimized_ops.items() if op in UNFUSED_QDQ_OPS)

    def forward(self, *args: torch.Tensor) -> Any:
        from qgraph.errors import KernelError

        if len(args) != len(self.inputs):
            raise KernelError(f"{self.path.name} takes {len(self.inputs)} inputs "
                              f"({', '.join(n for n, _ in self.inputs)}), got {len(args)}")
        feeds = {}
        for (name, typ), a in zip(self.inputs, args):
            if not isinstance(a, torch.Tensor):
                raise KernelError(f"input {name!r} must be a tensor, got {type(a).__name__}")
            want = _NP_TYPES.get(typ)
            if want is not None and a.dtype != want:
                raise KernelError(f"input {name!r} must be {want}, got {a.dtype}")
            feeds[name] = a.detach().cpu().contiguous().numpy()
        outs = self.session.run(None, feeds)
        tensors = [torch.from_numpy(o) for o in outs]
        return tensors[0] if len(tensors) == 1 else tuple(tensors)

    def summary(self) -> dict[str, Any]:
        return {"file": str(self.path), "fused_int8_ops": self.fused_int8_ops,
                "unfused_qdq_ops": self.unfused_qdq_ops, "optimized_ops": dict(sorted(self.optimized_ops.items()))}


_NP_TYPES = {"tensor(float)": torch.float32, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32,
             "tensor(float16)": torch.float16, "tensor(uint8)": torch.uint8, "tensor(int8)": torch.int8}


def onnxruntime_model(qmodel: Any, example_inputs: tuple | torch.Tensor, path: str | os.PathLike, *,
                      dynamic_shapes: Any = None, portable: bool = False, threads: int | None = None,
                      quantized_residuals: bool = True, spinning: bool = True) -> OrtModel:
    """Export ``qmodel`` to ``path`` and return it as a session-backed model with ORT's optimizations on.
    ``quantized_residuals`` (default here, unlike `export_onnx`): residual Adds read the Q/DQ'd outputs of
    convs / GEMMs whose outputs are quantized anyway, so onnxruntime runs those as int8 kernels too (the Add's
    input moves by at most half a quantization step from the simulation's). ``spinning=False``: onnxruntime's
    workers sleep between kernels instead of spin-waiting (for timing it in turns with other models)."""
    from qgraph.export.onnx_export import export_onnx

    export_onnx(qmodel, path, example_inputs, portable=portable, dynamic_shapes=dynamic_shapes,
                quantized_residuals=quantized_residuals)
    return OrtModel(path, threads=threads, custom_ops=not portable, spinning=spinning)
