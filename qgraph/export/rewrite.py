"""Replace the ``qgraph.export`` placeholders of an exported ONNX model (onnx_ir) by their final form.

- ``FakeQuant`` → ``QuantizeLinear → DequantizeLinear`` with the calibrated scale / zero point, int8 or uint8.
  A 7-bit range (128 codes: [-64, 63], [0, 127]) is written as that scale and zero point in 8-bit storage with no
  ``Clip``, so onnxruntime fuses it into its int8 kernels (a Clip between an op and its Q/DQ blocks
  that); values inside the calibrated range quantize identically, values beyond it saturate at the 8-bit
  storage's range instead of the 7-bit one (less clipping than the simulation). Narrower ranges (≤ 6 bits)
  keep a ``Clip`` to ``[(qmin − z)·s, (qmax − z)·s]`` in front, which quantizes identically.
- The float bias of a ``Conv`` / ``Gemm`` whose input and weight both come out of Q/DQ becomes int32 codes at
  scale ``s_x·s_w`` + DequantizeLinear (what onnxruntime's QDQ selectors need to fuse ``QLinearConv`` /
  ``QGemm``; a float bias leaves the op in float). Each bias moves by at most ``s_x·s_w / 2``.
- ``DequantizeWeight`` → an int8/uint8 (int4/uint4 at ≤ 4 bits, opset ≥ 21) initializer + ``DequantizeLinear``
  (per-tensor; per-channel with ``axis``; group-wise as a blocked DequantizeLinear, opset ≥ 21, or as
  `_group_arithmetic` where that cannot be used). A Transpose
  that only reorders the weight (``x @ Wᵀ``) is folded into the stored codes, so onnxruntime sees
  ``DQ(weight) → MatMul`` and can fuse it with the activation's Q/DQ into its int8 kernels.
- ``BCQLinear`` → ``ai.qgraph::BiQGEMM`` (see `qgraph.export.schema`), or the standard-op form of
  `qgraph.export.portable` when ``portable=True``.
- ``RowwiseGather`` → ``Gather`` of the integer rows (4-bit rows unpacked with BitwiseAnd / BitShift), ``Cast``,
  ``Sub`` of the gathered zero points, ``Mul`` by the gathered scales: only the looked-up rows are dequantized.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qgraph.errors import ExportError
from qgraph.export import portable as portable_mod
from qgraph.export import schema

_RANGES = {ir.DataType.INT8: (-128, 127), ir.DataType.UINT8: (0, 255), ir.DataType.INT4: (-8, 7),
           ir.DataType.UINT4: (0, 15)}
_NP = {ir.DataType.INT8: np.int8, ir.DataType.UINT8: np.uint8, ir.DataType.INT4: np.int8,
       ir.DataType.UINT4: np.uint8}


#: Activation ranges of at least this many codes (7 bits) are written without a Clip (see the module docstring).
CLIP_FREE_CODES = 128

#: Metadata on the first node of each activation Q/DQ chain (its input is the fake-quant's input) and on its
#: DequantizeLinear: the name of the fake-quant node in the quantized torch graph (see `qgraph.export.parity`).
FQ_INPUT_KEY = "qgraph.fake_quant_input"
FQ_OUTPUT_KEY = "qgraph.fake_quant_output"


@dataclass
class RewriteStats:
    counts: dict[str, int] = field(default_factory=dict)
    custom_domain: bool = False

    def add(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1


def rewrite(model: ir.Model, *, portable: bool = False, mu: int = 8,
            quantized_residuals: bool = False) -> RewriteStats:
    """Rewrite every placeholder in place; afterwards the model holds standard ONNX ops (and
    ``ai.qgraph::BiQGEMM`` unless ``portable``). Unused initializers are dropped."""
    opset = model.opset_imports.get("", 18)
    graph = model.graph
    stats = RewriteStats()
    handlers = {"FakeQuant": lambda g, n, o: _fake_quant(g, n, o, quantized_residuals=quantized_residuals),
                "DequantizeWeight": _dequantize_weight, "RowwiseGather": _rowwise_gather,
                "BCQLinear": lambda g, n, o: _biqgemm(g, n, o, portable=portable, mu=mu)}
    for node in list(graph):
        if node.domain != schema.PRIVATE_DOMAIN:
            continue
        if node.op_type not in handlers:
            raise ExportError(f"internal: no rewrite for placeholder {node.op_type}")
        handlers[node.op_type](graph, node, opset)
        stats.add(node.op_type)
    leftovers = [n for n in ir.traversal.RecursiveGraphIterator(graph) if n.domain == schema.PRIVATE_DOMAIN]
    if leftovers:
        raise ExportError(f"{len(leftovers)} quantized ops sit inside control-flow subgraphs, which the exporter "
                          f"does not rewrite; quantize the model without data-dependent control flow")
    for node in list(graph):
        if node.domain == "" and node.op_type in ("Conv", "Gemm") and _quantize_bias(graph, node):
            stats.add("Int32Bias")
    model.opset_imports.pop(schema.PRIVATE_DOMAIN, None)
    if any(n.domain == schema.DOMAIN for n in graph):
        model.opset_imports[schema.DOMAIN] = schema.VERSION
        stats.custom_domain = True
    _remove_unused(model)
    return stats


# ------------------------------------------------------------------------------------------ helpers
def _prefix(node: ir.Node, default: str) -> str:
    attr = node.attributes.get("name")
    name = attr.as_string() if attr is not None else ""
    return name or node.name or default


def _const(value: ir.Value | None, what: str, node: ir.Node) -> np.ndarray:
    if value is None or value.const_value is None:
        raise ExportError(f"{node.name}: {what} is not a constant initializer; the exporter cannot store it as "
                          f"quantized codes (was the weight computed at run time?)")
    return value.const_value.numpy()


def _finish(graph: ir.Graph, node: ir.Node, e: portable_mod.Emitter, result: ir.Value,
            also_remove: list[ir.Node] = ()) -> None:
    """Insert ``e``'s nodes before ``node``, hand its output (name, type, shape, uses) to ``result``, drop it
    (and ``also_remove``, nodes that only fed it)."""
    old = node.outputs[0]
    name, typ, shape = old.name, old.type, old.shape
    graph.insert_before(node, e.nodes)
    old.name = f"{name}__placeholder"
    ir.convenience.replace_all_uses_with(old, result, replace_graph_outputs=True)
    result.name = name
    result.type = typ if typ is not None else result.type
    result.shape = shape if shape is not None else result.shape
    graph.remove([node, *also_remove], safe=True)


def _storage_type(lo: int, hi: int, opset: int) -> ir.DataType:
    four = opset >= 21
    if lo >= 0:
        return ir.DataType.UINT4 if four and hi <= 15 else ir.DataType.UINT8
    return ir.DataType.INT4 if four and lo >= -8 and hi <= 7 else ir.DataType.INT8


def _check_range(arr: np.ndarray, dtype: ir.DataType, what: str, node: ir.Node) -> None:
    lo, hi = _RANGES[dtype]
    if arr.size and (arr.min() < lo or arr.max() > hi):
        raise ExportError(f"{node.name}: {what} outside [{lo}, {hi}] ({arr.min()}..{arr.max()}); the quantized "
                          f"model is corrupt or its spec does not match its codes — re-run quantize-weights")


def _check_scale(scale: np.ndarray, node: ir.Node) -> None:
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise ExportError(f"{node.name}: scales must be finite and > 0; re-run calibrate / quantize-weights "
                          f"(found {scale[~np.isfinite(scale) | (scale <= 0)][:4]})")


# ------------------------------------------------------------------------------------------ FakeQuant
def _fake_quant(graph: ir.Graph, node: ir.Node, opset: int, *, quantized_residuals: bool = False) -> None:
    """One Q/DQ pair per fake-quant, with its own initializers, even where several quantize the same tensor alike
    (q/k/v projections): onnxruntime fuses each pair with its MatMul into ``MatMulIntegerToFloat`` only then
    (36 of 36 MiniLM projections instead of 18), and its int8→uint8 conversion fails on shared zero points."""
    a = node.attributes
    s, zp = a["scale"].as_float(), a["zero_point"].as_int()
    qmin, qmax = a["qmin"].as_int(), a["qmax"].as_int()
    _check_scale(np.asarray([s]), node)
    if not qmin <= zp <= qmax or qmin >= qmax:
        raise ExportError(f"{node.name}: activation qparams are inconsistent (zero point {zp}, range "
                          f"[{qmin}, {qmax}]); re-run calibrate")
    # Activations stay 8-bit in ONNX: onnxruntime 1.2x fuses int4 Q/DQ around a Conv into a QLinearConv that
    # rejects int4, and has no int4 activation kernels to gain from them.
    dtype = _storage_type(qmin, qmax, 18)
    tlo, thi = _RANGES[dtype]
    if qmin < tlo or qmax > thi:
        raise ExportError(f"{node.name}: activation range [{qmin}, {qmax}] does not fit 8 bits; ONNX Q/DQ stores "
                          f"at most 8-bit activations")
    e = portable_mod.Emitter(graph, node.name or "fq")
    scale = e.const("scale", np.float32(s))
    lo, hi = np.float32((qmin - zp) * s), np.float32((qmax - zp) * s)
    if dtype == ir.DataType.INT8:  # the same codes shifted by 128: onnxruntime's x86 int8 kernels take uint8
        dtype, zp = ir.DataType.UINT8, zp + 128
    zero = e.const("zero_point", np.array(zp, dtype=_NP[dtype]), dtype)
    x = node.inputs[0]
    if qmax - qmin < CLIP_FREE_CODES - 1:
        x = e.op("Clip", [x, e.const("clip_min", lo), e.const("clip_max", hi)])
    q = e.op("QuantizeLinear", [x, scale, zero])
    y = e.op("DequantizeLinear", [q, scale, zero])
    name = _prefix(node, "")
    if name:
        e.nodes[0].metadata_props[FQ_INPUT_KEY] = name
        e.nodes[-1].metadata_props[FQ_OUTPUT_KEY] = name
    source = node.inputs[0]
    _finish(graph, node, e, y)
    src = source.producer() if quantized_residuals and source is not None else None
    if src is not None and src.domain == "" and src.op_type in ("Conv", "Gemm", "MatMul"):
        for user in list(source.consumers()):  # a residual Add reading the op's float output
            if user.op_type == "Add" and user.domain == "":
                for i, v in enumerate(user.inputs):
                    if v is source:
                        user.replace_input_with(i, y)


# ------------------------------------------------------------------------------------------ int32 bias
def _activation_scale(value: ir.Value | None) -> float | None:
    """The scale of an activation ``QuantizeLinear → DequantizeLinear`` pair producing ``value``."""
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "" or dq.inputs[0] is None:
        return None
    q = dq.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear" or dq.inputs[1] is None or dq.inputs[1].const_value is None:
        return None
    s = dq.inputs[1].const_value.numpy()
    return float(s.reshape(-1)[0]) if s.size == 1 else None


def _weight_scale(value: ir.Value | None, out_axis: int, channels: int) -> np.ndarray | None:
    """Per-output-channel scales ``[channels]`` of a weight ``DequantizeLinear`` of 8-bit initializer codes
    (per tensor, or per channel along ``out_axis``); None for anything else (blocked, group arithmetic)."""
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "" or "block_size" in dq.attributes:
        return None
    codes, scale = dq.inputs[0], dq.inputs[1]
    if codes is None or codes.const_value is None or scale is None or scale.const_value is None:
        return None
    if codes.const_value.dtype not in (ir.DataType.INT8, ir.DataType.UINT8):
        return None
    s = scale.const_value.numpy().astype(np.float64)
    if s.size == 1:
        return np.full(channels, float(s.reshape(-1)[0]))
    axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
    ndim = len(codes.const_value.shape)
    return s if s.shape == (channels,) and axis % ndim == out_axis else None


def _quantize_bias(graph: ir.Graph, node: ir.Node) -> bool:
    """Store a Conv / Gemm float bias as int32 codes at scale ``s_x·s_w`` when its input and weight are Q/DQ."""
    if len(node.inputs) < 3 or node.inputs[2] is None or node.inputs[2].const_value is None:
        return False
    bias_v = node.inputs[2]
    bias = bias_v.const_value.numpy()
    if bias.dtype != np.float32 or bias.ndim != 1:
        return False
    if node.op_type == "Gemm":
        if not _plain_gemm(node):
            return False
        out_axis = 0 if "transB" in node.attributes and node.attributes["transB"].as_int() else 1
    else:
        out_axis = 0
    s_x = _activation_scale(node.inputs[0])
    s_w = _weight_scale(node.inputs[1], out_axis, bias.shape[0])
    if s_x is None or s_w is None:
        return False
    scale = (s_x * s_w).astype(np.float32)
    codes = np.round(bias.astype(np.float64) / scale.astype(np.float64))
    if not np.all(np.isfinite(codes)) or np.abs(codes).max(initial=0) >= 2**31 - 1:
        return False
    e = portable_mod.Emitter(graph, (node.name or "op").replace("/", "_"))
    w = e.const("bias_int32", codes.astype(np.int32))
    y = e.op("DequantizeLinear", [w, e.const("bias_scale", scale), e.const("bias_zero_point", np.zeros(
        scale.shape, np.int32))], axis=0)
    graph.insert_before(node, e.nodes)
    node.replace_input_with(2, y)
    return True


# ------------------------------------------------------------------------------------------ DequantizeWeight
def _dequantize_weight(graph: ir.Graph, node: ir.Node, opset: int) -> None:
    a = node.attributes
    gran, axis = a["granularity"].as_string(), a["axis"].as_int()
    gs, bits = a["group_size"].as_int(), a["bits"].as_int()
    codes = _const(node.inputs[0], "weight codes", node)
    scale = _const(node.inputs[1], "weight scale", node).astype(np.float32)
    zp = _const(node.inputs[2], "weight zero point", node)
    _check_scale(scale, node)
    signed = codes.dtype == np.int8
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    dtype = _storage_type(lo, hi, opset)
    _check_range(codes, dtype, "weight codes", node)
    _check_range(zp, dtype, "weight zero points", node)
    axis = axis % codes.ndim
    transpose = _sole_transpose(node)
    gemm = _sole_gemm_weight(node) if transpose is None and gran == "group" and codes.ndim == 2 else None
    if gemm is not None and (opset < 21 or _feeds_quantized_activation_op(node)):
        gemm = None
    if transpose is not None and (gran != "group" or codes.ndim == 2):
        perm = list(transpose.attributes["perm"].as_ints())
        codes = codes.transpose(perm)
        axis = perm.index(axis)  # scale / zero point keep their [C] or [C, G] layout
        out_node = transpose
    elif gemm is not None:  # Gemm(x, W, b, transB=1) → MatMul(x, Wᵀ) + b: onnxruntime makes it MatMulNBits
        codes, axis, out_node = codes.T, 1 - axis, gemm
    else:
        out_node = node
    e = portable_mod.Emitter(graph, _prefix(node, "dq"))
    zp = zp.astype(_NP[dtype])
    if gran in ("tensor", "channel"):
        w = e.const("weight", codes.astype(_NP[dtype]), dtype)
        attrs = {"axis": axis} if gran == "channel" else {}
        y = e.op("DequantizeLinear", [w, e.const("weight_scale", scale), e.const("weight_zero_point", zp, dtype)],
                 **attrs)
    elif gran == "group":
        if opset >= 21 and not _feeds_quantized_activation_op(out_node):
            y = _blocked(e, codes, scale, zp, axis, gs, dtype, node)
        else:
            y = _group_arithmetic(e, codes, scale, zp, axis, gs, dtype)
    else:
        raise ExportError(f"{node.name}: unknown weight granularity {gran!r}")
    if gemm is not None:
        y = e.op("MatMul", [gemm.inputs[0], y])
        if len(gemm.inputs) > 2 and gemm.inputs[2] is not None:
            y = e.op("Add", [y, gemm.inputs[2]])
    _finish(graph, out_node, e, y, also_remove=[node] if out_node is not node else [])


def _blocked(e, codes, scale, zp, axis, gs, dtype, node) -> ir.Value:
    if codes.ndim == 2:
        block_axis = 1 - axis
        if axis == 1:
            scale, zp = scale.T, zp.T
        w = e.const("weight", codes.astype(_NP[dtype]), dtype)
        return e.op("DequantizeLinear", [w, e.const("weight_scale", scale),
                                         e.const("weight_zero_point", zp, dtype)], axis=block_axis, block_size=gs)
    moved = np.moveaxis(codes, axis, 0)
    rows = moved.reshape(moved.shape[0], -1)
    w = e.const("weight", rows.astype(_NP[dtype]), dtype)
    y = e.op("DequantizeLinear", [w, e.const("weight_scale", scale), e.const("weight_zero_point", zp, dtype)],
             axis=1, block_size=gs)
    y = e.op("Reshape", [y, e.ints("shape", list(moved.shape))])
    if axis != 0:
        inv = list(np.argsort([axis, *[d for d in range(codes.ndim) if d != axis]]))
        y = e.op("Transpose", [y], perm=[int(p) for p in inv])
    return y


def _group_arithmetic(e, codes, scale, zp, axis, gs, dtype) -> ir.Value:
    """Group-wise dequantization as ``(DQ(codes, 1, 0) − z) · s`` per group: for opsets without blocked
    DequantizeLinear, and where onnxruntime would fuse a blocked weight DQ with quantized activations into
    ``MatMulIntegerToFloat`` / ``QLinearConv``, which reject block-wise scales. Same float values as the blocked
    form; onnxruntime folds the constant subgraph into a float weight when the session starts."""
    moved = np.moveaxis(codes, axis, 0)
    c = moved.shape[0]
    rows = moved.reshape(c, -1)
    g = rows.shape[1] // gs
    w = e.const("weight", rows.astype(_NP[dtype]), dtype)
    unit = e.op("DequantizeLinear", [w, e.const("weight_unit_scale", np.float32(1.0)),
                                     e.const("weight_unit_zero", np.array(0, dtype=_NP[dtype]), dtype)])
    grouped = e.op("Reshape", [unit, e.ints("shape_groups", [c, g, gs])])
    y = e.op("Mul", [e.op("Sub", [grouped, e.const("weight_zero_point", zp.astype(np.float32)[..., None])]),
                     e.const("weight_scale", scale.astype(np.float32)[..., None])])
    y = e.op("Reshape", [y, e.ints("shape", list(moved.shape))])
    if axis != 0:
        inv = list(np.argsort([axis, *[d for d in range(codes.ndim) if d != axis]]))
        y = e.op("Transpose", [y], perm=[int(p) for p in inv])
    return y


def _feeds_quantized_activation_op(producer: ir.Node) -> bool:
    """Whether the weight's consumer also takes a Q/DQ'd activation (placeholder or already rewritten)."""
    for consumer in producer.outputs[0].consumers():
        for inp in consumer.inputs:
            src = inp.producer() if inp is not None else None
            if src is None or src is producer:
                continue
            if (src.domain, src.op_type) == (schema.PRIVATE_DOMAIN, "FakeQuant"):
                return True
            if src.op_type == "DequantizeLinear" and src.domain == "" and src.inputs[0] is not None and \
                    src.inputs[0].producer() is not None and src.inputs[0].producer().op_type == "QuantizeLinear":
                return True
    return False


def _plain_gemm(node: ir.Node) -> bool:
    """A Gemm computing ``A·B(ᵀ) + C`` as is: no transA, alpha = beta = 1."""
    a = node.attributes
    return not ("transA" in a and a["transA"].as_int()) and all(
        k not in a or a[k].as_float() == 1.0 for k in ("alpha", "beta"))


def _sole_gemm_weight(node: ir.Node) -> ir.Node | None:
    """The Gemm that alone consumes ``node``'s output as its ``B`` with ``transB=1`` (``x @ Wᵀ + b``)."""
    out = node.outputs[0]
    users = list(out.consumers())
    if len(users) != 1 or out.is_graph_output():
        return None
    g = users[0]
    a = g.attributes
    if g.op_type != "Gemm" or g.domain != "" or len(g.inputs) < 2 or g.inputs[1] is not out or \
            g.inputs[0] is out or not _plain_gemm(g) or "transB" not in a or not a["transB"].as_int():
        return None
    return g


def _sole_transpose(node: ir.Node) -> ir.Node | None:
    out = node.outputs[0]
    users = list(out.consumers())
    if len(users) == 1 and not out.is_graph_output():
        t = users[0]
        if t.op_type == "Transpose" and t.domain == "" and "perm" in t.attributes:
            return t
    return None


# ------------------------------------------------------------------------------------------ BiQGEMM
def _biqgemm(graph: ir.Graph, node: ir.Node, opset: int, *, portable: bool, mu: int) -> None:
    a = node.attributes
    m, k, gs = a["out_features"].as_int(), a["in_features"].as_int(), a["group_size"].as_int()
    ins = list(node.inputs) + [None] * (5 - len(node.inputs))
    x, planes_v, alpha_v, offset_v, bias_v = ins
    planes = _const(planes_v, "bit-planes", node)
    alpha = _const(alpha_v, "alpha", node)
    q = alpha.shape[0]
    g = -(-k // gs)
    if planes.dtype != np.uint8 or planes.shape != (q, m, (k + 7) // 8) or alpha.shape != (q, m, g):
        raise ExportError(f"{node.name}: BCQ weight has planes {planes.dtype}{list(planes.shape)} and alpha "
                          f"{list(alpha.shape)}, which do not describe a {m}x{k} matrix with group {gs}; "
                          f"the BCQWeight is corrupt — re-run quantize-weights")
    if not np.all(np.isfinite(alpha)):
        raise ExportError(f"{node.name}: BCQ alpha holds non-finite values; re-run quantize-weights")
    offset = None if offset_v is None else _const(offset_v, "offset", node)
    bias = None if bias_v is None else _const(bias_v, "bias", node)
    e = portable_mod.Emitter(graph, _prefix(node, "biqgemm"))
    if portable:
        y = portable_mod.emit_biqgemm(e, x, planes, alpha, offset, bias, m, k, gs, mu)
    else:
        empty = _empty(graph)
        ins = [x, e.const("planes", planes), e.const("alpha", alpha.astype(np.float32)),
               empty if offset is None else e.const("z", offset.astype(np.float32)),
               empty if bias is None else e.const("bias", bias.astype(np.float32))]
        y = e.op("BiQGEMM", ins, domain=schema.DOMAIN, out_features=m, in_features=k, group_size=gs, bits=q)
    _finish(graph, node, e, y)


def _empty(graph: ir.Graph) -> ir.Value:
    name = "qgraph.none"
    if name not in graph.initializers:
        t = ir.Tensor(np.zeros((0,), np.float32), name=name)
        graph.register_initializer(ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=t.shape,
                                            const_value=t))
    return graph.initializers[name]


# ------------------------------------------------------------------------------------------ RowwiseGather
def _rowwise_gather(graph: ir.Graph, node: ir.Node, opset: int) -> None:
    a = node.attributes
    bits, dim = a["bits"].as_int(), a["dim"].as_int()
    ids, codes_v, scale_v, zp_v = node.inputs
    scale_np = _const(scale_v, "embedding scales", node).astype(np.float32)
    _check_scale(scale_np, node)
    codes = _const(codes_v, "embedding codes", node)
    zp_np = _const(zp_v, "embedding zero points", node).astype(np.float32)
    if codes.ndim != 2 or scale_np.shape != (codes.shape[0],) or zp_np.shape != (codes.shape[0],):
        raise ExportError(f"{node.name}: row-wise embedding needs codes [V, D] and per-row scale / zero point [V]; "
                          f"got {list(codes.shape)}, {list(scale_np.shape)}, {list(zp_np.shape)}")
    e = portable_mod.Emitter(graph, _prefix(node, "gather"))
    codes_v, scale_v, zp_v = (e.const("weight", codes), e.const("weight_scale", scale_np),
                              e.const("weight_zero_point", zp_np))
    rows = e.op("Gather", [codes_v, ids], axis=0)
    if bits <= 4:  # BitwiseAnd needs opset 18, the exporter's minimum
        low = e.op("BitwiseAnd", [rows, e.const("low_mask", np.uint8(15))])
        high = e.op("BitShift", [rows, e.const("shift", np.uint8(4))], direction="RIGHT")
        axis = e.ints("last_axis", [-1])
        pair = e.op("Concat", [e.op("Unsqueeze", [low, axis]), e.op("Unsqueeze", [high, axis])], axis=-1)
        lead = e.op("Shape", [ids])
        rows = e.op("Reshape", [pair, e.op("Concat", [lead, e.ints("packed_dim", [-1])], axis=0)])
        if codes.shape[1] * 2 != dim:
            rows = e.op("Slice", [rows, e.ints("start", [0]), e.ints("end", [dim]), axis])
    vals = e.op("Cast", [rows], to=ir.DataType.FLOAT)
    zero = e.op("Unsqueeze", [e.op("Gather", [zp_v, ids], axis=0), e.ints("unsqueeze_axis", [-1])])
    scale = e.op("Unsqueeze", [e.op("Gather", [scale_v, ids], axis=0), e.ints("unsqueeze_axis2", [-1])])
    _finish(graph, node, e, e.op("Mul", [e.op("Sub", [vals, zero]), scale]))


# ------------------------------------------------------------------------------------------ cleanup
def _remove_unused(model: ir.Model) -> None:
    """Drop the nodes, opsets and initializers the rewrite orphaned."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

    RemoveUnusedNodesPass()(model)
    RemoveUnusedOpsetsPass()(model)
    graph = model.graph
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]
