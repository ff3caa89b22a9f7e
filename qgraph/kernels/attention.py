"""``qgraph::decode_attention``: attention of one query row per head over a (static) KV cache.

``decode_attention(q [B, H, 1, D], k [B, KVH, S, D], v [B, KVH, S, D], mask [B|1, 1, 1, S] bool or None, scale)
-> [B, H, 1, D]``: ``softmax(q kᵀ · scale, masked) v``, query head ``h`` reading key/value head ``h // (H / KVH)``
(grouped-query attention without copying the cache per query head). ``True`` in the mask attends; a row whose
positions are all masked gives zeros.

Why an op of its own: at decode the whole problem is a few hundred KB, and torch's CPU flash-attention kernel
costs 35-90 µs per call for SmolLM2's 9 heads × 256 cached positions (an OpenMP team woken for microseconds of
work, block set-up), while under ``torch.compile`` Hugging Face's SDPA path also copies the cache per query
head (``repeat_kv``). The native shim (`qgraph.kernels.native`) registers a one-thread CPU kernel that skips
masked positions; the Python implementation below is the reference (and the fallback without the shim).
"""
from __future__ import annotations

import torch

from qgraph.errors import KernelError

SCHEMA = "decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor"

_LIB = torch.library.Library("qgraph", "FRAGMENT")
_LIB.define(SCHEMA)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[2] != 1:
        raise KernelError(f"decode_attention takes q [B, H, 1, D], k and v [B, KVH, S, D]; got q {tuple(q.shape)}, "
                          f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype != torch.float32 or k.dtype != torch.float32 or v.dtype != torch.float32:
        raise KernelError("decode_attention runs float32 q, k and v only; cast them with .float()")
    b, h, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or k.shape[1] == 0 or h % k.shape[1]:
        raise KernelError(f"decode_attention: k and v must both be [B, KVH, S, D] with H a multiple of KVH; got q "
                          f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or tuple(mask.shape[1:]) != (1, 1, k.shape[2])
                             or mask.shape[0] not in (1, b)):
        raise KernelError(f"decode_attention: mask must be bool [B or 1, 1, 1, S] (True = attend); got {mask.dtype} "
                          f"{tuple(mask.shape)}")


def _impl(q, k, v, mask, scale):
    _check(q, k, v, mask)
    b, h, _, d = q.shape
    kvh = k.shape[1]
    qq = q.reshape(b, kvh, h // kvh, d)
    s = torch.matmul(qq, k.transpose(-1, -2)) * scale  # [B, KVH, rep, S]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all-masked rows: zeros
    return torch.matmul(p, v).reshape(b, h, 1, d)


def _fake(q, k, v, mask, scale):
    _check(q, k, v, mask)
    return q.new_empty(q.shape)


_LIB.impl("decode_attention", _impl, "CompositeExplicitAutograd")
torch.library.register_fake("qgraph::decode_attention", _fake, lib=_LIB)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """``torch.ops.qgraph.decode_attention``; ``scale`` defaults to ``D ** -0.5``. On CPU it runs the native kernel
    once `qgraph.kernels.native.load` has run (the first BiQGEMM call or `qgraph.llm.attention.use_decode_attention`
    loads it; never inside a graph torch.compile traces, whose lock would break the graph), else the reference."""
    return torch.ops.qgraph.decode_attention(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else float(scale))
