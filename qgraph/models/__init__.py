"""Bundled real models that install offline from package registries (see DESIGN.md section 8).

Importing this package does not import transformers; the loaders do, on first use.
"""

from qgraph.models.minilm import MiniLMEmbedder, encode, load_minilm
from qgraph.models.mobilenetv2 import MobileNetV2, load_mobilenetv2
from qgraph.models.registry import BUNDLED, BundledModel, LoadedModel, get_bundled
from qgraph.models.smollm2 import CausalLMLogits, load_smollm2, perplexity

__all__ = [
    "BUNDLED",
    "BundledModel",
    "CausalLMLogits",
    "LoadedModel",
    "MiniLMEmbedder",
    "MobileNetV2",
    "encode",
    "get_bundled",
    "load_minilm",
    "load_mobilenetv2",
    "load_smollm2",
    "perplexity",
]
