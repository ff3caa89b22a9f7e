"""ONNX export of quantized models and the onnxruntime helpers to run them.

- `export_onnx`: QDQ for uniform layers, ``ai.qgraph::BiQGEMM`` (or standard ops with ``portable=True``) for
  BCQ layers, integer-row gathers for quantized embeddings.
- `session_options`: onnxruntime session options with ``ai.qgraph::BiQGEMM`` registered.
- `parity`: float ↔ fake-quant ↔ lowered torch ↔ onnxruntime errors on the same inputs.
"""
from qgraph.export.onnx_export import ExportInfo, PreparedONNX, export_onnx, load_metadata, prepare_onnx
from qgraph.export.ort_ops import session_options
from qgraph.export.parity import parity

__all__ = ["ExportInfo", "PreparedONNX", "export_onnx", "load_metadata", "parity", "prepare_onnx", "session_options"]
