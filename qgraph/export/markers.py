"""Marker ops: torch custom ops (namespace ``qgraph_export``) that stand for quantized computations in the
graph handed to the torch ONNX exporter, and their translations into ``qgraph.export`` placeholder nodes.

Each marker computes exactly what the quantized model computes (so the prepared module can be checked against
it in torch), and each translation records everything the ONNX rewrite needs as inputs (initializers) and
attributes. The exporter never sees a dequantized float weight or a fake-quant decomposition.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from qgraph.errors import ExportError
from qgraph.export import schema

NAMESPACE = "qgraph_export"
_LIB = torch.library.Library(NAMESPACE, "DEF")
_LIB.define("fake_quant(Tensor x, float scale, int zero_point, int qmin, int qmax, str name) -> Tensor")
_LIB.define("dequantize_weight(Tensor codes, Tensor scale, Tensor zero_point, str granularity, int axis, "
            "int group_size, int bits, str name) -> Tensor")
_LIB.define("biqgemm(Tensor x, Tensor planes, Tensor alpha, Tensor? offset, Tensor? bias, int out_features, "
            "int in_features, int group_size, str name) -> Tensor")
_LIB.define("rowwise_gather(Tensor ids, Tensor codes, Tensor scale, Tensor zero_point, int bits, int dim, "
            "str name) -> Tensor")


# ------------------------------------------------------------------------------------------ implementations
def _fake_quant(x, scale, zero_point, qmin, qmax, name):
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)


def _dequantize_weight(codes, scale, zero_point, granularity, axis, group_size, bits, name):
    q, z = codes.to(torch.float32), zero_point.to(torch.float32)
    if granularity == "tensor":
        return (q - z) * scale
    if granularity == "channel":
        shape = [1] * codes.dim()
        shape[axis] = codes.shape[axis]
        return (q - z.reshape(shape)) * scale.reshape(shape)
    moved = q.movedim(axis, 0)
    g = moved.reshape(moved.shape[0], -1, group_size)
    out = (g - z.unsqueeze(-1)) * scale.unsqueeze(-1)
    return out.reshape(moved.shape).movedim(0, axis)


def _biqgemm(x, planes, alpha, offset, bias, out_features, in_features, group_size, name):
    return torch.ops.qgraph.biqgemm(x, planes, alpha, offset, bias, out_features, in_features, group_size, "planes")


def unpack_nibbles(rows: Tensor, dim: int) -> Tensor:
    """uint8 ``[..., ceil(dim/2)]`` of two 4-bit values each (low nibble first) → uint8 ``[..., dim]``."""
    return torch.stack((rows & 0xF, rows >> 4), dim=-1).flatten(-2)[..., :dim]


def _rowwise_gather(ids, codes, scale, zero_point, bits, dim, name):
    rows = codes[ids]
    if bits <= 4:
        rows = unpack_nibbles(rows, dim)
    return (rows.to(torch.float32) - zero_point[ids].unsqueeze(-1)) * scale[ids].unsqueeze(-1)


_LIB.impl("fake_quant", _fake_quant, "CompositeExplicitAutograd")
_LIB.impl("dequantize_weight", _dequantize_weight, "CompositeExplicitAutograd")
_LIB.impl("biqgemm", _biqgemm, "CompositeExplicitAutograd")
_LIB.impl("rowwise_gather", _rowwise_gather, "CompositeExplicitAutograd")


@torch.library.register_fake(f"{NAMESPACE}::fake_quant", lib=_LIB)
def _fake_quant_meta(x, scale, zero_point, qmin, qmax, name):
    return torch.empty_like(x)


@torch.library.register_fake(f"{NAMESPACE}::dequantize_weight", lib=_LIB)
def _dequantize_weight_meta(codes, scale, zero_point, granularity, axis, group_size, bits, name):
    return codes.new_empty(codes.shape, dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::biqgemm", lib=_LIB)
def _biqgemm_meta(x, planes, alpha, offset, bias, out_features, in_features, group_size, name):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake(f"{NAMESPACE}::rowwise_gather", lib=_LIB)
def _rowwise_gather_meta(ids, codes, scale, zero_point, bits, dim, name):
    return scale.new_empty((*ids.shape, dim))


# ------------------------------------------------------------------------------------------ modules
class BiQGEMMExport(nn.Module):
    """A BCQ Linear in the canonical `BCQWeight` layout, calling the ``biqgemm`` marker."""

    def __init__(self, w, bias: Tensor | None, name: str = ""):
        super().__init__()
        self.qname = name
        self.out_features, self.in_features = w.shape
        self.group_size = w.group_size
        self.register_buffer("planes", w.planes.detach().cpu().contiguous())
        self.register_buffer("alpha", w.alpha.detach().cpu().to(torch.float32).contiguous())
        self.register_buffer("offset", None if w.offset is None else w.offset.detach().cpu().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().cpu().to(torch.float32).contiguous())

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.qgraph_export.biqgemm(x, self.planes, self.alpha, self.offset, self.bias,
                                               self.out_features, self.in_features, self.group_size, self.qname)


class RowwiseGatherExport(nn.Module):
    """An embedding stored as per-row codes: ``(u[ids] − z[ids]) · s[ids]`` with u the stored unsigned/signed
    codes (4-bit ones two per byte, low nibble first) and z a float zero point that absorbs any code offset."""

    def __init__(self, codes: Tensor, scale: Tensor, zero_point: Tensor, bits: int, dim: int, name: str = ""):
        super().__init__()
        self.bits, self.dim, self.qname = bits, dim, name
        self.register_buffer("codes", codes.detach().cpu().contiguous())
        self.register_buffer("scale", scale.detach().cpu().to(torch.float32).contiguous())
        self.register_buffer("zero_point", zero_point.detach().cpu().to(torch.float32).contiguous())

    def forward(self, ids: Tensor) -> Tensor:
        return torch.ops.qgraph_export.rowwise_gather(ids, self.codes, self.scale, self.zero_point, self.bits,
                                                      self.dim, self.qname)


class DequantizedWeightCall(nn.Module):
    """Runs ``inner`` (a Linear / Conv / Embedding-like module) with its weight computed by the
    ``dequantize_weight`` marker from integer codes; the float weight is dropped."""

    def __init__(self, inner: nn.Module, codes: Tensor, scale: Tensor, zero_point: Tensor, granularity: str,
                 axis: int, group_size: int, bits: int, name: str = ""):
        super().__init__()
        self.qname = name
        if not isinstance(getattr(inner, "weight", None), Tensor):
            raise ExportError(f"{type(inner).__name__} has no tensor 'weight'; cannot export its quantized weight")
        del inner.weight
        inner.register_buffer("weight", torch.empty(0), persistent=False)
        self.inner = inner
        self.granularity, self.axis, self.group_size, self.bits = granularity, axis, group_size, bits
        self.register_buffer("codes", codes.detach().cpu().contiguous())
        self.register_buffer("scale", scale.detach().cpu().to(torch.float32).contiguous())
        self.register_buffer("zero_point", zero_point.detach().cpu().contiguous())

    def forward(self, *args, **kwargs):
        w = torch.ops.qgraph_export.dequantize_weight(self.codes, self.scale, self.zero_point, self.granularity,
                                                      self.axis, self.group_size, self.bits, self.qname)
        return torch.func.functional_call(self.inner, {"weight": w}, args, kwargs)


# ------------------------------------------------------------------------------------------ translations
def _placeholder(name: str):
    import onnxscript

    schema.register()
    return getattr(onnxscript.values.Opset(schema.PRIVATE_DOMAIN, schema.VERSION), name)


def _t_fake_quant(x, scale: float, zero_point: int, qmin: int, qmax: int, name: str):
    return _placeholder("FakeQuant")(x, scale=float(scale), zero_point=int(zero_point), qmin=int(qmin),
                                     qmax=int(qmax), name=name)


def _t_dequantize_weight(codes, scale, zero_point, granularity: str, axis: int, group_size: int, bits: int,
                         name: str):
    return _placeholder("DequantizeWeight")(codes, scale, zero_point, granularity=granularity, axis=int(axis),
                                            group_size=int(group_size), bits=int(bits), name=name)


def _t_biqgemm(x, planes, alpha, offset, bias, out_features: int, in_features: int, group_size: int, name: str):
    return _placeholder("BCQLinear")(x, planes, alpha, offset, bias, out_features=int(out_features),
                                     in_features=int(in_features), group_size=int(group_size), name=name)


def _t_rowwise_gather(ids, codes, scale, zero_point, bits: int, dim: int, name: str):
    return _placeholder("RowwiseGather")(ids, codes, scale, zero_point, bits=int(bits), dim=int(dim), name=name)


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: marker op → placeholder builder."""
    ops = torch.ops.qgraph_export
    return {
        ops.fake_quant.default: _t_fake_quant,
        ops.dequantize_weight.default: _t_dequantize_weight,
        ops.biqgemm.default: _t_biqgemm,
        ops.rowwise_gather.default: _t_rowwise_gather,
    }


FAKE_QUANT_TARGETS = (torch.fake_quantize_per_tensor_affine, torch.ops.aten.fake_quantize_per_tensor_affine.default)
