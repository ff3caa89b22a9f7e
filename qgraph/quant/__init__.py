"""Quantization numerics: specs, uniform and binary-coding quantizers, observers."""
from qgraph.quant.bcq import bcq_importance, bcq_objective, bcq_round, quantize_bcq, quantize_bcq_spec
from qgraph.quant.bcq_weight import BCQWeight, pack_signs, unpack_signs
from qgraph.quant.block_scaled import BlockScaledWeight
from qgraph.quant.observers import OBSERVERS, Observer, make_observer, observer_for
from qgraph.quant.qspec import Annotation, QSpec
from qgraph.quant.uniform import (
    compute_qparams,
    dequantize,
    fake_quantize,
    min_max,
    quantize,
    quantize_weight,
)

__all__ = [
    "OBSERVERS",
    "Annotation",
    "BCQWeight",
    "BlockScaledWeight",
    "Observer",
    "QSpec",
    "bcq_importance",
    "bcq_objective",
    "bcq_round",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "make_observer",
    "min_max",
    "observer_for",
    "pack_signs",
    "quantize",
    "quantize_bcq",
    "quantize_bcq_spec",
    "quantize_weight",
    "unpack_signs",
]
