"""ONNX operator schemas of the ops qgraph writes.

- ``ai.qgraph::BiQGEMM`` (version 1), the public custom op of exported BCQ layers::

      Y = X @ Ŵᵀ + bias,   Ŵ[m, k] = z[m, g] + Σ_i alpha[i, m, g] · (2·bit_i[m, k] − 1),   g = k // group_size

  inputs ``X`` float ``[..., in_features]``; ``planes`` uint8 ``[bits, out_features, ceil(in_features/8)]``
  (bit ``k % 8`` of byte ``k // 8``, LSB first, 1 ↔ +1: the `BCQWeight` layout); ``alpha`` float
  ``[bits, out_features, G]``; ``z`` float ``[out_features, G]`` and ``bias`` float ``[out_features]``, where an
  empty tensor (shape ``[0]``) means "none" (the onnxruntime-extensions PyOp that runs it cannot take omitted
  inputs). Attributes ``out_features``, ``in_features``, ``group_size``, ``bits``. Output float
  ``[..., out_features]``.
- ``qgraph.export::*`` (private, version 1): placeholders the torch exporter emits for qgraph's marker ops;
  `qgraph.export.rewrite` replaces every one of them before a file is written, so they never reach a file.

Registering the schemas lets ``onnx.checker`` validate BiQGEMM nodes and lets onnxscript build the placeholders.
"""
from __future__ import annotations

from functools import lru_cache

import onnx
from onnx.defs import OpSchema

DOMAIN = "ai.qgraph"
PRIVATE_DOMAIN = "qgraph.export"
VERSION = 1

_S = OpSchema.FormalParameterOption.Single
_O = OpSchema.FormalParameterOption.Optional
_ATTR = {"i": OpSchema.AttrType.INT, "f": OpSchema.AttrType.FLOAT, "s": OpSchema.AttrType.STRING}
_FLOAT = ["tensor(float)"]
_CODES = ["tensor(int8)", "tensor(uint8)"]


def _schema(name: str, domain: str, doc: str, inputs, outputs, attrs, types) -> OpSchema:
    return OpSchema(
        name, domain, VERSION, doc,
        inputs=[OpSchema.FormalParameter(n, t, param_option=opt) for n, t, opt in inputs],
        outputs=[OpSchema.FormalParameter(n, t) for n, t in outputs],
        type_constraints=[(t, allowed, "") for t, allowed in types],
        attributes=[OpSchema.Attribute(a, _ATTR[kind], "") for a, kind in attrs],
    )


def _schemas() -> list[OpSchema]:
    bq_attrs = [("out_features", "i"), ("in_features", "i"), ("group_size", "i"), ("bits", "i")]
    return [
        _schema("BiQGEMM", DOMAIN, "BCQ matrix product y = x @ Ŵᵀ + bias (see qgraph.export.schema)",
                [("X", "T", _S), ("planes", "B", _S), ("alpha", "T", _S), ("z", "T", _S), ("bias", "T", _S)],
                [("Y", "T")], bq_attrs, [("T", _FLOAT), ("B", ["tensor(uint8)"])]),
        _schema("FakeQuant", PRIVATE_DOMAIN, "placeholder: per-tensor fake quantization",
                [("x", "T", _S)], [("y", "T")],
                [("scale", "f"), ("zero_point", "i"), ("qmin", "i"), ("qmax", "i"), ("name", "s")],
                [("T", _FLOAT)]),
        _schema("DequantizeWeight", PRIVATE_DOMAIN, "placeholder: uniform weight codes -> float",
                [("codes", "C", _S), ("scale", "T", _S), ("zero_point", "Z", _S)], [("y", "T")],
                [("granularity", "s"), ("axis", "i"), ("group_size", "i"), ("bits", "i"), ("name", "s")],
                [("T", _FLOAT), ("C", _CODES), ("Z", ["tensor(int32)", "tensor(int64)", *_CODES])]),
        _schema("BCQLinear", PRIVATE_DOMAIN, "placeholder: BCQ matrix product",
                [("x", "T", _S), ("planes", "B", _S), ("alpha", "T", _S), ("offset", "T", _O), ("bias", "T", _O)],
                [("y", "T")], [*bq_attrs[:3], ("name", "s")], [("T", _FLOAT), ("B", ["tensor(uint8)"])]),
        _schema("RowwiseGather", PRIVATE_DOMAIN, "placeholder: row-wise quantized embedding lookup",
                [("ids", "I", _S), ("codes", "C", _S), ("scale", "T", _S), ("zero_point", "T", _S)], [("y", "T")],
                [("bits", "i"), ("dim", "i"), ("name", "s")],
                [("T", _FLOAT), ("C", _CODES), ("I", ["tensor(int32)", "tensor(int64)"])]),
    ]


@lru_cache(maxsize=1)
def register() -> None:
    """Register the schemas with onnx (once per process; schemas already there are left alone)."""
    for s in _schemas():
        if not onnx.defs.has(s.name, s.since_version, s.domain):
            onnx.defs.register_schema(s)
