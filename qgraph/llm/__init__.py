"""Language models on BiQGEMM: quantize a Hugging Face causal LM with qgraph's passes, swap its modules for
BiQGEMM ones, save / reload the result as an artifact, and generate with Hugging Face ``generate()``."""
from qgraph.llm.modules import BCQEmbedding, as_bcq, fuse_shared_inputs, uniform_to_bcq
from qgraph.llm.quantize import LMWeights, apply_weights, calibration_rows, quantize_lm, simulate_weights
from qgraph.llm.recipe import LMRecipe

__all__ = [
    "BCQEmbedding",
    "LMRecipe",
    "LMWeights",
    "apply_weights",
    "as_bcq",
    "calibration_rows",
    "fuse_shared_inputs",
    "quantize_lm",
    "simulate_weights",
    "uniform_to_bcq",
]
