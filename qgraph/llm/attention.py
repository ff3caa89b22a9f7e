"""Hugging Face attention for decoding on qgraph's `decode_attention` op.

`use_decode_attention(model)` registers the attention implementation ``"qgraph_decode"`` with transformers'
`AttentionInterface` (and SDPA's boolean masks with `AttentionMaskInterface`) and switches the model to it:
one-token steps with a boolean (or no) mask run ``torch.ops.qgraph.decode_attention`` (grouped key/value heads
read in place, masked cache positions skipped, one thread); every other call (the prompt, float masks, dropout,
soft-capping, position biases, non-float32) is transformers' own SDPA path, unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from qgraph.kernels.attention import decode_attention

NAME = "qgraph_decode"
_registered = False


def _forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
             is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    mask_ok = attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.dim() == 4
                                         and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1)
    if (query.shape[2] == 1 and mask_ok and not dropout and kwargs.get("softcap") is None
            and kwargs.get("position_bias") is None and query.dtype == key.dtype == value.dtype == torch.float32
            and query.device.type == "cpu" and not kwargs.get("output_attentions", False)):
        out = decode_attention(query, key, value, attention_mask, scaling)
        return out.transpose(1, 2), None  # [B, 1, H, D], as the SDPA path returns
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register() -> str:
    """Register ``"qgraph_decode"`` with transformers (idempotent); returns the name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, _forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    return NAME


def use_decode_attention(model: Any) -> bool:
    """Switch a transformers model that runs SDPA attention to ``"qgraph_decode"`` in place; False (and nothing
    changed) for a model on another implementation (eager, flash, flex) or one transformers refuses to switch."""
    cfg = getattr(model, "config", None)
    current = getattr(cfg, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError):
        return False
    from qgraph.kernels import native

    native.load()  # now, not inside a graph torch.compile traces later
    return True
