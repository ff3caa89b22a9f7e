"""Dynamic int8 activations: per-token (or per-tensor) scales computed on the fly, int8 x int8 -> int32 GEMM.

Ops (``torch.library``, CompositeImplicitAutograd, so ``torch.compile`` / ``torch.export`` see their pieces:
the quantize prologue and rescale epilogue are plain ATen ops Inductor fuses, the GEMM stays one kernel):
- ``qgraph::fake_quant_dynamic(x, bits, signed, symmetric, per_token)``: the simulation (quantize-dequantize
  with scales from ``x``), what ``insert-fq`` puts in front of a layer with a dynamic activation spec;
- ``qgraph::dynamic_int8_linear(x, codes, w_scale, bias, bits, symmetric, per_token, impl)``: the lowered layer.
  ``y = s_x (q_x - z_x) (q_w)^T s_w + b`` where ``q_x, s_x, z_x`` come from `qgraph.quant.uniform.quantize_dynamic`
  (the same codes the simulation rounds to). ``impl="onednn"`` runs ``qgraph::int8_linear`` (oneDNN u8 x s8
  with the symmetric zero point folded in; exact with VNNI) with a unit activation scale and multiplies each
  row by its token scale; ``impl="int_mm"`` (the default) runs ``torch._int_mm`` (exact everywhere) and
  subtracts ``z_x · rowsum(q_w)`` per token (asymmetric specs; row sums precomputed).
"""
from __future__ import annotations

import torch
from torch import nn

from qgraph.errors import KernelError
from qgraph.kernels import onednn_ops  # noqa: F401 - registers qgraph::int8_linear
from qgraph.kernels.int8 import _channel_scales, _check_codes, int8_matmul, saturation_possible
from qgraph.quant.qspec import QSpec
from qgraph.quant.uniform import fake_quantize_dynamic, quantize_dynamic

IMPLS = ("onednn", "int_mm")


def _absmax(codes: torch.Tensor) -> int:
    return int(codes.to(torch.int16).abs().max()) if codes.numel() else 0

_LIB = torch.library.Library("qgraph", "FRAGMENT")
_LIB.define("fake_quant_dynamic(Tensor x, int bits, bool signed, bool symmetric, bool per_token) -> Tensor")
_LIB.define("dynamic_int8_linear(Tensor x, Tensor codes, Tensor w_scale, Tensor? bias, Tensor? row_sums, int bits, "
            "bool symmetric, bool per_token, str impl) -> Tensor")


def activation_spec(bits: int, signed: bool, symmetric: bool, per_token: bool) -> QSpec:
    """The dynamic QSpec an op's scalar arguments describe."""
    return QSpec.uniform(bits, signed=signed, symmetric=symmetric, granularity="token" if per_token else "tensor",
                         dynamic=True)


def op_args(spec: QSpec) -> tuple[int, bool, bool, bool]:
    """``(bits, signed, symmetric, per_token)`` of a dynamic spec, the ops' scalar arguments."""
    if not spec.dynamic:
        raise KernelError(f"the dynamic int8 ops take a dynamic activation spec, got {spec}")
    return spec.bits, spec.signed, spec.symmetric, spec.granularity == "token"


def _fake_quant_dynamic(x, bits, signed, symmetric, per_token):
    return fake_quantize_dynamic(x, activation_spec(bits, signed, symmetric, per_token))


def _dynamic_int8_linear(x, codes, w_scale, bias, row_sums, bits, symmetric, per_token, impl):
    spec = activation_spec(bits, True, symmetric, per_token)
    k = codes.shape[1]
    x2 = x.reshape(-1, k)
    q, s, z = quantize_dynamic(x2, spec)
    if impl == "onednn" and symmetric:
        # u8 codes q + 128 with zero point 128: oneDNN subtracts 128 · rowsum(q_w) in int32
        y = torch.ops.qgraph.int8_linear((q.to(torch.int16) + 128).to(torch.uint8), 1.0, 128, codes, w_scale, None)
        y = y * s
    else:
        acc = int8_matmul(q, codes.t())
        if not symmetric:
            acc = acc - z * (row_sums if row_sums is not None else codes.to(torch.int32).sum(1))
        y = acc.to(torch.float32) * (w_scale * s)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], codes.shape[0]).to(x.dtype)


_LIB.impl("fake_quant_dynamic", _fake_quant_dynamic, "CompositeImplicitAutograd")
_LIB.impl("dynamic_int8_linear", _dynamic_int8_linear, "CompositeImplicitAutograd")


def fake_quant_dynamic(x: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """``torch.ops.qgraph.fake_quant_dynamic`` for a dynamic spec."""
    return torch.ops.qgraph.fake_quant_dynamic(x, *op_args(spec))


def is_fake_quant_dynamic(target) -> bool:
    """Whether an fx node target is the dynamic fake quant (as inserted, or as an exported graph names it)."""
    return target in (torch.ops.qgraph.fake_quant_dynamic, torch.ops.qgraph.fake_quant_dynamic.default)


class DynamicInt8Linear(nn.Module):
    """``y = x @ W^T + b`` with x quantized per token (or per tensor) at run time and W int8 per output channel
    (symmetric). Accepts ``x`` of shape ``[..., K]``."""

    qgraph_op_type = "DynamicInt8Gemm"

    def __init__(self, codes: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, spec: QSpec,
                 impl: str = "auto"):
        super().__init__()
        _check_codes(codes, "DynamicInt8Linear")
        if codes.dim() != 2:
            raise KernelError(f"DynamicInt8Linear needs a [N, K] weight, got shape {tuple(codes.shape)}")
        bits, signed, symmetric, per_token = op_args(spec)
        if not signed or bits > 8:
            raise KernelError(f"DynamicInt8Linear quantizes activations to signed codes of at most 8 bits, got {spec}")
        if impl == "auto":  # torch._int_mm: exact, and faster than oneDNN at MiniLM's shapes (bench/dynamic_int8.py)
            impl = "int_mm"
        if impl == "onednn" and symmetric and saturation_possible(1 << bits, _absmax(codes)):
            raise KernelError("oneDNN's u8 x s8 products may saturate on this CPU (AVX2 without VNNI) with these "
                              "codes; use impl='int_mm' (exact)")
        if impl not in IMPLS:
            raise KernelError(f"DynamicInt8Linear impl must be 'auto' or one of {IMPLS}, got {impl!r}")
        if impl == "onednn" and not symmetric:
            raise KernelError("the oneDNN dynamic path takes symmetric activation codes; use impl='int_mm'")
        n, k = codes.shape
        self.spec, self.impl = spec, impl
        self.in_features, self.out_features = k, n
        self.register_buffer("codes", codes.detach().contiguous())
        self.register_buffer("weight_scale", _channel_scales(weight_scale, n))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.register_buffer("row_sums", None if symmetric else codes.detach().to(torch.int32).sum(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise KernelError(f"DynamicInt8Linear expects inputs [..., {self.in_features}], got {tuple(x.shape)}")
        bits, _, symmetric, per_token = op_args(self.spec)
        return torch.ops.qgraph.dynamic_int8_linear(x, self.codes, self.weight_scale, self.bias, self.row_sums, bits,
                                                    symmetric, per_token, self.impl)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, activations={self.spec}, impl={self.impl}"
