"""``qgraph::int8_conv2d`` / ``qgraph::int8_linear``: oneDNN int8 kernels behind ops that take plain int8 codes.

oneDNN's ops take an opaque prepacked weight, which an exported program cannot store as data. These ops take
the int8 weight codes (an ordinary tensor) and prepack them on first use, keeping the packed weight in a
cache keyed by the codes tensor itself (a weak reference: the entry goes when the codes go, and a reused
address never serves a stale pack). Lowered graphs that call them therefore export, serialize and reload
as data, and run the same oneDNN kernels as before.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch

_LIB = torch.library.Library("qgraph", "FRAGMENT")
_LIB.define(
    "int8_conv2d(Tensor q, float x_scale, int x_zp, Tensor codes, Tensor w_scale, Tensor? bias, int[] stride, "
    "int[] padding, int[] dilation, int groups, float out_scale, int out_zp, bool out_u8, str attr, float lo, "
    "float hi) -> Tensor")
_LIB.define("int8_linear(Tensor q, float x_scale, int x_zp, Tensor codes, Tensor w_scale, Tensor? bias) -> Tensor")

_CACHE: dict[tuple, tuple[weakref.ref, Any]] = {}


def _cached(codes: torch.Tensor, key: tuple, make) -> Any:
    full = (id(codes), codes._version, *key)
    hit = _CACHE.get(full)
    if hit is not None and hit[0]() is codes:
        return hit[1]
    packed = make()
    _CACHE[full] = (weakref.ref(codes, lambda _, k=full: _CACHE.pop(k, None)), packed)
    return packed


def _zeros(codes: torch.Tensor) -> torch.Tensor:
    """The weight zero points oneDNN takes (symmetric codes): built once per pack, not per call."""
    return torch.zeros(codes.shape[0], dtype=torch.int64)


def _conv_impl(q, x_scale, x_zp, codes, w_scale, bias, stride, padding, dilation, groups, out_scale, out_zp,
               out_u8, attr, lo, hi):
    packed, w_zero = _cached(
        codes, ("conv", x_scale, x_zp, tuple(stride), tuple(padding), tuple(dilation), groups),
        lambda: (torch.ops.onednn.qconv_prepack(codes, w_scale, x_scale, x_zp, list(stride), list(padding),
                                                list(dilation), groups, None), _zeros(codes)))
    scalars = [lo, hi] if attr == "hardtanh" else []
    out_dtype = torch.uint8 if out_u8 else torch.float32
    return torch.ops.onednn.qconv2d_pointwise(
        q.contiguous(memory_format=torch.channels_last), x_scale, x_zp, packed, w_scale, w_zero, bias, list(stride),
        list(padding), list(dilation), groups, out_scale, out_zp, out_dtype, attr, scalars, "")


def _conv_fake(q, x_scale, x_zp, codes, w_scale, bias, stride, padding, dilation, groups, out_scale, out_zp,
               out_u8, attr, lo, hi):
    n, _, h, w = q.shape
    kh, kw = codes.shape[2], codes.shape[3]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return q.new_empty((n, codes.shape[0], oh, ow), dtype=torch.uint8 if out_u8 else torch.float32).contiguous(
        memory_format=torch.channels_last)


def _linear_impl(q, x_scale, x_zp, codes, w_scale, bias):
    packed, zeros = _cached(codes, ("linear",), lambda: (torch.ops.onednn.qlinear_prepack(codes, None), _zeros(codes)))
    return torch.ops.onednn.qlinear_pointwise(q, x_scale, x_zp, packed, w_scale, zeros, bias, 1.0, 0, torch.float32,
                                              "none", [], "")


def _linear_fake(q, x_scale, x_zp, codes, w_scale, bias):
    return q.new_empty((q.shape[0], codes.shape[0]), dtype=torch.float32)


_LIB.impl("int8_conv2d", _conv_impl, "CPU")
_LIB.impl("int8_linear", _linear_impl, "CPU")
torch.library.register_fake("qgraph::int8_conv2d", _conv_fake, lib=_LIB)
torch.library.register_fake("qgraph::int8_linear", _linear_fake, lib=_LIB)
