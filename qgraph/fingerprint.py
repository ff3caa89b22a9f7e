"""Content fingerprints of float models (what an artifact records to recognize the model it was made from)."""
from __future__ import annotations

import hashlib

import torch
from torch import nn


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over a float model's parameters and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
