"""Node-metadata keys: what the passes record on a node (``GraphView.meta(node)[KEY]``), in one place.

The IR layer, the passes, the exporter, the artifact writer and the search all read these, so they live here
rather than in the pass that writes them (their old homes re-export them).
"""
from __future__ import annotations

ANNOTATION_KEY = "qgraph.annotation"  # annotate: an Annotation (weight / input / output QSpecs)
FUSION_KEY = "qgraph.fusion"  # fuse-activation, on the producer: the pattern, e.g. "Conv+Relu"
FUSED_INTO_KEY = "qgraph.fused_into"  # fuse-activation, on the activation: the producer's name
QPARAMS_KEY = "qgraph.qparams"  # calibrate: {"input0": (scale, zero_point), ...}
QWEIGHT_KEY = "qgraph.qweight"  # quantize-weights / gptq / ...: the quantized weight (UniformWeight, BCQWeight, ...)
FQ_KEY = "qgraph.fake_quant"  # insert-fq: True once the node's weight and input fake quants are in
SPARQ_KEY = "qgraph.sparq"  # sparq: the window settings of a fake-quant node
LOWERED_KEY = "qgraph.lowered"  # lower-int8 / lower-weight-only: {"kernel", "annotation"} of a lowered node
LOWERED_FROM_KEY = "qgraph.lowered_from"  # every lowering: the name of the node a lowered node replaced
KERNEL_KEY = "qgraph.kernel"  # replace_with_kernel: what the new node runs (a BiQGEMM layout, an ONNX op)

__all__ = ["ANNOTATION_KEY", "FQ_KEY", "FUSED_INTO_KEY", "FUSION_KEY", "KERNEL_KEY", "LOWERED_FROM_KEY",
           "LOWERED_KEY", "QPARAMS_KEY", "QWEIGHT_KEY", "SPARQ_KEY"]
