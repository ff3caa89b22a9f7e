"""The ONNX adapter: `OnnxGraph` is a `GraphView` over an onnx_ir model, executed by onnxruntime.

Weights are exposed in the ``[out, in]`` orientation the shared quantization logic expects:
``MatMul(x, W)`` stores ``W`` as ``[in, out]`` and ``Gemm`` may have ``transB=0``, so `param` returns
the transposed view there and `set_param` transposes back. Calibration (`collect`) adds the
observed values as extra graph outputs and runs onnxruntime.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from qgraph.errors import CalibrationError, ExportError, KernelError
from qgraph.ir.graph_view import GRAPH_KERNELS, KERNELS
from qgraph.ir.meta import KERNEL_KEY, LOWERED_FROM_KEY, QWEIGHT_KEY

MIN_OPSET, MAX_OPSET = 13, 23
UPGRADE_FROM, UPGRADE_TO = 7, 17  # older default-domain opsets are converted to UPGRADE_TO on load
_NUMPY_DTYPES = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.bool: np.bool_}


def load_onnx(path_or_proto: str | Path | onnx.ModelProto | bytes) -> OnnxGraph:
    """Read and check an ONNX model; corrupt or unsupported files raise `ExportError` saying why."""
    name = str(path_or_proto) if isinstance(path_or_proto, (str, Path)) else "<onnx model>"
    try:
        if isinstance(path_or_proto, onnx.ModelProto):
            proto = path_or_proto
        elif isinstance(path_or_proto, bytes):
            proto = onnx.load_from_string(path_or_proto)
        else:
            if not Path(path_or_proto).is_file():
                raise ExportError(f"{name} does not exist")
            proto = onnx.load(str(path_or_proto))
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"{name} is not a readable ONNX model ({type(e).__name__}: {str(e)[:200]}); "
                          f"re-export it or check the file is complete") from None
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    upgraded_from = None
    if opset is not None and UPGRADE_FROM <= opset < MIN_OPSET:
        proto, upgraded_from, opset = _upgrade(proto, opset, name), opset, UPGRADE_TO
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"{name}: default-domain opset {opset} is unsupported; qgraph reads opsets "
                          f"{MIN_OPSET}..{MAX_OPSET} and upgrades {UPGRADE_FROM}..{MIN_OPSET - 1} (convert older "
                          f"models with onnx.version_converter, or re-export them)")
    proto = _initializers_not_inputs(proto)
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise ExportError(f"{name} fails onnx.checker: {str(e).splitlines()[0][:300]}") from None
    _check_structure(proto, name)
    try:
        model = ir.from_proto(proto)
        _lift_constants(model)
        ir.to_proto(model)  # names or attributes the IR cannot write back fail here, not mid-pipeline
    except Exception as e:
        raise ExportError(f"{name} cannot be read into the IR: {type(e).__name__}: {str(e)[:200]}") from None
    graph = OnnxGraph(model, name=Path(name).stem)
    graph.example_inputs = example_inputs_for(graph)  # like a traced graph, it can run without being told how
    if upgraded_from is not None:
        graph.notes.append(f"default-domain opset {upgraded_from} upgraded to {UPGRADE_TO} with onnx.version_converter")
    return graph


def _upgrade(proto: onnx.ModelProto, opset: int, name: str) -> onnx.ModelProto:
    """``proto`` converted to opset `UPGRADE_TO` by onnx.version_converter, with a warning that says so."""
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(proto, UPGRADE_TO)
    except Exception as e:  # noqa: BLE001 - the converter raises C++ errors of many kinds
        raise ExportError(f"{name}: default-domain opset {opset} could not be upgraded to {UPGRADE_TO} by "
                          f"onnx.version_converter ({type(e).__name__}: {str(e).splitlines()[0][:200]}); re-export "
                          f"the model at opset {MIN_OPSET} or newer") from None
    floor = onnx.helper.find_min_ir_version_for(list(converted.opset_import), ignore_unknown=True)
    converted.ir_version = max(converted.ir_version, floor)
    warnings.warn(f"{name}: ONNX default-domain opset {opset} upgraded to {UPGRADE_TO} with onnx.version_converter",
                  OpsetUpgradeWarning, stacklevel=3)
    return converted


def _initializers_not_inputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop graph inputs that name an initializer (the IR < 4 convention, still common in model zoos): qgraph
    treats them as the constants they hold, not as inputs a caller feeds."""
    names = {t.name for t in proto.graph.initializer}
    if not any(i.name in names for i in proto.graph.input):
        return proto
    original, proto = proto, onnx.ModelProto()
    proto.CopyFrom(original)  # the caller's proto stays as it was
    keep = [i for i in proto.graph.input if i.name not in names]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    proto.ir_version = max(proto.ir_version, 4)
    return proto


def _lift_constants(model: ir.Model) -> None:
    """Tensor-valued Constant nodes become initializers (older exporters store weights that way), so `param`
    sees a Conv / Gemm / BatchNormalization constant whichever way the file holds it."""
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    if any(n.op_type == "Constant" and n.domain in ("", "ai.onnx") for n in model.graph):
        LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(model)


class OpsetUpgradeWarning(UserWarning):
    """An ONNX model below opset 13 was upgraded with onnx.version_converter on load."""


def _check_structure(proto: onnx.ModelProto, name: str) -> None:
    """Dangling inputs and missing initializers, which the checker accepts in some forms."""
    g = proto.graph
    known = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    for node in g.node:
        for inp in node.input:
            if inp not in known:
                raise ExportError(f"{name}: node {node.name or node.op_type} reads {inp!r}, which no graph input, "
                                  f"initializer or earlier node provides")
        known.update(node.output)
    for out in g.output:
        if out.name not in known:
            raise ExportError(f"{name}: graph output {out.name!r} is produced by no node")


class OnnxGraph:
    """A `GraphView` over an ONNX model (onnx_ir), run with onnxruntime."""

    ir = "onnx"
    frontend = "onnx"
    live_collect = False  # calibration values come back after each onnxruntime run

    def __init__(self, model: ir.Model, *, name: str = "model", example_inputs: tuple = ()):
        self.model = model
        self.name_ = name
        self.properties: set[str] = set()
        self.example_inputs = tuple(example_inputs)
        self.notes: list[str] = []  # what load_onnx changed on the way in (opset upgrade)
        self._session = None

    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    # --- structure -------------------------------------------------------------------------
    def nodes(self) -> list[ir.Node]:
        return list(self.model.graph)

    def input_nodes(self) -> list[ir.Value]:
        return [v for v in self.model.graph.inputs if not v.is_initializer()]

    def op_type(self, node: ir.Node) -> str:
        return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"

    def name(self, node: Any) -> str:
        return node.name or ""

    def qualname(self, node: ir.Node) -> str:
        scope = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        if scope:
            try:
                parts = [p for p in eval_list(scope) if p]
                return ".".join(parts[1:]) if len(parts) > 1 else node.name
            except ValueError:
                pass
        return node.name

    def inputs(self, node: ir.Node) -> list[ir.Value]:
        return [v for v in node.inputs if v is not None and v.const_value is None]

    def producers(self, node: ir.Node) -> list[ir.Node | None]:
        return [v.producer() for v in self.inputs(node)]

    def users(self, node: ir.Node) -> list[ir.Node]:
        return list(dict.fromkeys(u.node for out in node.outputs for u in out.uses()))

    def meta(self, node: ir.Node) -> dict[str, Any]:
        return node.meta

    def attribute(self, node: ir.Node, name: str, default: Any = None) -> Any:
        """The attribute's value; when the node omits it, the operator schema's default (``epsilon`` of
        BatchNormalization: 1e-5), else ``default``."""
        attr = node.attributes.get(name)
        if attr is not None:
            return attr.value
        domain = "" if node.domain == "ai.onnx" else node.domain
        try:
            schema = onnx.defs.get_schema(node.op_type, self.model.opset_imports.get(domain, 1), domain)
        except onnx.defs.SchemaError:
            return default
        spec = schema.attributes.get(name)
        if spec is None or spec.default_value.type == onnx.AttributeProto.UNDEFINED:
            return default
        return onnx.helper.get_attribute_value(spec.default_value)

    def _const_matrix(self, node: ir.Node, idx: int) -> bool:
        v = node.inputs[idx] if idx < len(node.inputs) else None
        return v is not None and v.const_value is not None and len(v.const_value.shape) == 2

    def _data_input(self, node: ir.Node, idx: int) -> bool:
        v = node.inputs[idx] if idx < len(node.inputs) else None
        return v is not None and v.const_value is None

    def is_linear(self, node: ir.Node) -> bool:
        if node.domain not in ("", "ai.onnx") or not self._data_input(node, 0) or not self._const_matrix(node, 1):
            return False
        if node.op_type == "MatMul":
            return True
        return node.op_type == "Gemm" and not self.attribute(node, "transA", 0) and \
            self.attribute(node, "alpha", 1.0) == 1.0 and self.attribute(node, "beta", 1.0) == 1.0

    def is_embedding(self, node: ir.Node) -> bool:
        return node.domain in ("", "ai.onnx") and node.op_type == "Gather" and self.attribute(node, "axis", 0) == 0 \
            and self._const_matrix(node, 0) and self._data_input(node, 1)

    def weight_layout(self, node: ir.Node) -> str | None:
        """``"nk"`` for Conv and for Gemm / MatMul with a constant 2-D weight: `param` presents those as
        ``[out, in]`` whatever their storage (``transB``, MatMul's ``[in, out]``)."""
        if node.op_type == "Conv" and self.param(node, "weight") is not None:
            return "nk"
        if node.op_type in ("Gemm", "MatMul") and self._const_matrix(node, 1):
            return "nk"
        return None

    def shares_weight(self, node: ir.Node) -> bool:
        slot = self._weight_slot(node, "weight")
        v = node.inputs[slot[0]] if slot is not None and slot[0] < len(node.inputs) else None
        return v is not None and v.const_value is not None and len(v.uses()) > 1

    # --- constants -------------------------------------------------------------------------
    def _weight_slot(self, node: ir.Node, role: str) -> tuple[int, bool] | None:
        """(input index, stored transposed) of a constant by role."""
        op = node.op_type
        if role == "weight":
            if op == "Gemm":
                trans_b = node.attributes.get("transB")
                return 1, not (trans_b is not None and trans_b.value)
            if op == "MatMul":
                return 1, True
            if op == "Conv":
                return 1, False
            if op == "Gather":
                return 0, False
        if role == "bias" and op in ("Gemm", "Conv"):
            return 2, False
        if op == "BatchNormalization":
            slot = {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4}.get(role)
            return (slot, False) if slot is not None else None
        return None

    def param(self, node: ir.Node, role: str) -> torch.Tensor | None:
        slot = self._weight_slot(node, role)
        if slot is None:
            return None
        idx, transposed = slot
        v = node.inputs[idx] if idx < len(node.inputs) else None
        if v is None or v.const_value is None:
            return None
        arr = v.const_value.numpy()
        if transposed and arr.ndim != 2:
            return None
        return torch.from_numpy(np.array(arr.T if transposed else arr, copy=True))

    def set_param(self, node: ir.Node, role: str, value: torch.Tensor) -> None:
        slot = self._weight_slot(node, role)
        if slot is None:
            raise KeyError(f"{node.op_type} node {node.name} has no constant input {role!r}")
        idx, transposed = slot
        arr = value.detach().cpu().numpy()
        arr = np.ascontiguousarray(arr.T if transposed else arr)
        if idx >= len(node.inputs):
            node.resize_inputs(idx + 1)
        old = node.inputs[idx]
        new = ir.Value(name=self._fresh_name(f"{node.name}_{role}"), const_value=ir.tensor(arr))
        self.model.graph.register_initializer(new)
        node.replace_input_with(idx, new)
        if old is not None and old.is_initializer() and not old.uses():
            self.model.graph.initializers.pop(old.name, None)
        self._session = None

    def _fresh_name(self, hint: str) -> str:
        names = set(self.model.graph.initializers) | {v.name for n in self.model.graph for v in n.outputs}
        base, i = hint.replace("/", "_").replace(".", "_") or "qgraph", 0
        name = base
        while name in names:
            i += 1
            name = f"{base}_{i}"
        return name

    # --- shapes ----------------------------------------------------------------------------
    def shape(self, node: Any) -> tuple | None:
        v = node.outputs[0] if isinstance(node, ir.Node) else node
        if v.shape is None:
            return None
        return tuple(d if isinstance(d, int) else str(d) for d in v.shape)

    def dynamic_dims(self) -> list[set[int]]:
        out = []
        for v in self.input_nodes():
            out.append({i for i, d in enumerate(v.shape or ()) if not isinstance(d, int)})
        return out

    # --- edits -----------------------------------------------------------------------------
    def wrap_input(self, node: ir.Node, idx: int, target: Any, extra_args: tuple = ()) -> ir.Node:
        """Insert QuantizeLinear→DequantizeLinear on input ``idx`` (the ONNX form of a per-tensor fake quant)."""
        value = self.inputs(node)[idx]
        new_nodes, dq = self._qdq(value, f"{node.name}_in{idx}", target, extra_args)
        self.model.graph.insert_before(node, new_nodes)
        pos = next(i for i, v in enumerate(node.inputs) if v is value)
        node.replace_input_with(pos, dq.outputs[0])
        self._session = None
        return dq

    def wrap_output(self, node: ir.Node, target: Any, extra_args: tuple = ()) -> ir.Node:
        """Insert QuantizeLinear→DequantizeLinear on ``node``'s output; every reader (graph outputs included)
        then reads the dequantized value."""
        value = node.outputs[0]
        uses = list(value.uses())
        new_nodes, dq = self._qdq(value, f"{node.name}_out", target, extra_args)
        self.model.graph.insert_after(node, new_nodes)
        for use in uses:
            use.node.replace_input_with(use.idx, dq.outputs[0])
        outputs = self.model.graph.outputs
        for i, v in enumerate(outputs):
            if v is value:
                dq.outputs[0].name, value.name = value.name, self._fresh_name(f"{value.name}_float")
                outputs[i] = dq.outputs[0]
        self._session = None
        return dq

    def _qdq(self, value: ir.Value, tag: str, target: Any, extra_args: tuple) -> tuple[list[ir.Node], ir.Node]:
        """The nodes of one per-tensor fake quant of ``value`` (initializers registered), and its DQ node."""
        if target is not torch.fake_quantize_per_tensor_affine:
            raise ExportError(f"the ONNX adapter can only insert per-tensor fake quantization, not {target}")
        scale, zp, qmin, qmax = extra_args
        dtype = np.int8 if qmin < 0 else np.uint8
        s = ir.Value(name=self._fresh_name(f"{tag}_scale"), const_value=ir.tensor(np.float32(scale)))
        z = ir.Value(name=self._fresh_name(f"{tag}_zp"), const_value=ir.tensor(dtype(zp)))
        consts = [s, z]
        new_nodes = []
        if qmax - qmin < 127:
            # a code range narrower than 7 bits (4-bit): QuantizeLinear saturates only to the dtype's range, so
            # clip x to the codes' float range first (same result as clamping the codes). 7-bit ranges get no
            # Clip, which would keep onnxruntime from fusing the Q/DQ into its int8 kernels (as in
            # qgraph.export.rewrite): values beyond the calibrated range then saturate at 8 bits
            lo = ir.Value(name=self._fresh_name(f"{tag}_lo"), const_value=ir.tensor(np.float32(scale * (qmin - zp))))
            hi = ir.Value(name=self._fresh_name(f"{tag}_hi"), const_value=ir.tensor(np.float32(scale * (qmax - zp))))
            consts += [lo, hi]
            clip = ir.Node("", "Clip", [value, lo, hi], name=self._fresh_name(f"{tag}_clip"))
            clip.outputs[0].name = self._fresh_name(f"{tag}_clipped")
            new_nodes.append(clip)
            value = clip.outputs[0]
        for c in consts:
            self.model.graph.register_initializer(c)
        q = ir.Node("", "QuantizeLinear", [value, s, z], name=self._fresh_name(f"{tag}_quant"))
        dq = ir.Node("", "DequantizeLinear", [q.outputs[0], s, z], name=self._fresh_name(f"{tag}_dequant"))
        q.outputs[0].name = self._fresh_name(f"{tag}_q")
        dq.outputs[0].name = self._fresh_name(f"{tag}_dq")
        return [*new_nodes, q, dq], dq

    def eliminate_dead_code(self) -> int:
        """Remove nodes and initializers that no graph output depends on; return how many went away."""
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        before = self.model.graph.num_nodes() + len(self.model.graph.initializers)
        RemoveUnusedNodesPass()(self.model)
        removed = before - self.model.graph.num_nodes() - len(self.model.graph.initializers)
        if removed:
            self._session = None
        return removed

    def weights_to_qdq(self) -> list[str]:
        """Store each uniformly quantized weight still held as float values as integer codes + DequantizeLinear,
        the way `replace_with_kernel` (``dequantize_linear``) and `qgraph.export` write it (per tensor / channel;
        per group blocked from opset 21, the equivalent Sub / Mul form below). Returns the nodes left float (none
        today; kept for callers that report them)."""
        from qgraph.quant.qtensor import UniformWeight

        for node in self.nodes():
            q = node.meta.get(QWEIGHT_KEY)
            if isinstance(q, UniformWeight) and self._weight_slot(node, "weight") is not None:
                self._dequantize_weight(node, q)
        return []

    def replace_all_uses(self, old: Any, new: Any) -> None:
        old.outputs[0].replace_all_uses_with(new.outputs[0])
        self._session = None

    def replace_node(self, old: ir.Node, new: ir.Node) -> None:
        _take_over(old.outputs[0], new.outputs[0])
        self.model.graph.remove(old, safe=True)
        self._session = None

    def scale_input(self, nodes: list[ir.Node], idx: int, factor: torch.Tensor) -> ir.Node:
        value = self.inputs(nodes[0])[idx]
        first = nodes[0]
        c = ir.Value(name=self._fresh_name(f"{first.name}_input_scale"),
                     const_value=ir.tensor(np.ascontiguousarray(factor.detach().cpu().numpy())))
        self.model.graph.register_initializer(c)
        mul = ir.Node("", "Mul", [value, c], name=self._fresh_name(f"{first.name}_scale_input"))
        mul.outputs[0].name = self._fresh_name(f"{first.name}_in{idx}_scaled")
        self.model.graph.insert_before(first, mul)
        for n in nodes:
            for pos, v in enumerate(n.inputs):
                if v is value:
                    n.replace_input_with(pos, mul.outputs[0])
        self._session = None
        return mul

    def supports_kernel(self, kernel: str) -> bool:
        return kernel in KERNELS or kernel in GRAPH_KERNELS

    def replace_with_kernel(self, node: ir.Node, kernel: str, qweight: Any, *, bias: torch.Tensor | None = None,
                            **options: Any) -> ir.Node:
        """The node becomes what `qgraph.export` writes for it: ``ai.qgraph::BiQGEMM`` (the exact product; there
        is no int8-table mode in ONNX) or a row-wise Gather of integer codes. Built as the exporter's placeholder
        and rewritten by `qgraph.export.rewrite`, so a saved lowered graph is the exported file."""
        from qgraph.export import rewrite as rewrite_mod
        from qgraph.export import schema

        if kernel == "dequantize_linear":
            return self._dequantize_weight(node, qweight)
        name = self.name(node) or self._fresh_name(node.op_type)
        g = self.model.graph

        def const(suffix: str, arr: np.ndarray) -> ir.Value:
            v = ir.Value(name=self._fresh_name(f"{name}_{suffix}"), const_value=ir.tensor(np.ascontiguousarray(arr)))
            g.register_initializer(v)
            return v

        if kernel == "biqgemm":
            m, k = qweight.shape
            x = self.inputs(node)[0]
            ins = [x, const("planes", qweight.planes.cpu().numpy()),
                   const("alpha", qweight.alpha.cpu().to(torch.float32).numpy()),
                   None if qweight.offset is None else const("offset", qweight.offset.cpu().numpy()),
                   None if bias is None else const("bias", bias.detach().cpu().to(torch.float32).numpy())]
            attrs = [ir.AttrInt64("out_features", m), ir.AttrInt64("in_features", k),
                     ir.AttrInt64("group_size", qweight.group_size), ir.AttrString("name", name)]
            placeholder = ir.Node(schema.PRIVATE_DOMAIN, "BCQLinear", ins, attributes=attrs, name=f"{name}__bcq")
        elif kernel == "rowwise_gather":
            codes, zp, bits = _rowwise_codes(qweight, packed=self.model.opset_imports.get("", 0) >= 18)
            ins = [self.inputs(node)[0], const("codes", codes), const("scale", qweight.scale.cpu().to(torch.float32)
                                                                           .numpy()), const("zero_point", zp)]
            attrs = [ir.AttrInt64("bits", bits), ir.AttrInt64("dim", int(qweight.codes.shape[1])),
                     ir.AttrString("name", name)]
            placeholder = ir.Node(schema.PRIVATE_DOMAIN, "RowwiseGather", ins, attributes=attrs, name=f"{name}__rows")
        else:
            raise KernelError(f"the ONNX adapter has no kernel {kernel!r}; it builds "
                              f"{', '.join(KERNELS + GRAPH_KERNELS)}")
        out = node.outputs[0]
        out_name = out.name
        g.insert_before(node, placeholder)
        ir.convenience.replace_all_uses_with(out, placeholder.outputs[0], replace_graph_outputs=True)
        out.name = self._fresh_name(f"{out_name}__lowered")
        placeholder.outputs[0].name = out_name
        placeholder.outputs[0].type, placeholder.outputs[0].shape = out.type, out.shape
        g.remove(node, safe=True)
        self.model.opset_imports.setdefault(schema.PRIVATE_DOMAIN, schema.VERSION)
        schema.register()
        rewrite_mod.rewrite(self.model)
        new = next(n for n in g if any(o.name == out_name for o in n.outputs))
        new.name = name  # the node it replaced: verify compares them by name
        new.meta[LOWERED_FROM_KEY] = name
        note = " (exact: the ONNX op has no int8-table mode)" if options.get("mode", "exact") != "exact" else ""
        new.meta[KERNEL_KEY] = f"{new.domain + '::' if new.domain else ''}{new.op_type}{note}"
        self._session = None
        return new

    def _dequantize_weight(self, node: ir.Node, qweight: Any) -> ir.Node:
        """``node``'s (Gemm, MatMul, Conv, Gather) constant weight becomes ``qweight``'s integer codes + DequantizeLinear, as the
        exporter writes it (its ``DequantizeWeight`` placeholder, then `qgraph.export.rewrite`): int8 / uint8 codes
        (int4 / uint4 from opset 21), per-tensor, per-channel (``axis``) or blocked per group (opset 21; below,
        the equivalent Sub / Mul form). A weight stored ``[in, out]`` gets a Transpose the rewrite folds into the
        codes. The node keeps running in float on the dequantized weight; onnxruntime fuses the pair where it
        has a kernel (e.g. blocked 4-bit MatMul into MatMulNBits) and folds the rest at session start."""
        from qgraph.export import rewrite as rewrite_mod
        from qgraph.export import schema
        from qgraph.quant.qtensor import UniformWeight

        slot = self._weight_slot(node, "weight")
        w = self.param(node, "weight") if node.op_type in ("Gemm", "MatMul", "Conv", "Gather") else None
        if not isinstance(qweight, UniformWeight) or w is None or tuple(qweight.shape) != tuple(w.shape):
            raise KernelError(f"dequantize_linear takes the uniform weight of a Gemm / MatMul / Conv / Gather with a "
                              f"constant weight; {node.op_type} {node.name} with {type(qweight).__name__} does not fit")
        idx, transposed = slot
        name = self.name(node) or self._fresh_name(node.op_type)
        g = self.model.graph
        spec = qweight.spec

        def const(suffix: str, t: torch.Tensor) -> ir.Value:
            v = ir.Value(name=self._fresh_name(f"{name}_{suffix}"),
                         const_value=ir.tensor(np.ascontiguousarray(t.detach().cpu().numpy())))
            g.register_initializer(v)
            return v

        ins = [const("codes", qweight.codes), const("scale", qweight.scale.to(torch.float32)),
               const("zero_point", qweight.zero_point)]
        attrs = [ir.AttrString("granularity", spec.granularity), ir.AttrInt64("axis", spec.axis),
                 ir.AttrInt64("group_size", spec.group_size or 0), ir.AttrInt64("bits", spec.bits),
                 ir.AttrString("name", name)]
        placeholder = ir.Node(schema.PRIVATE_DOMAIN, "DequantizeWeight", ins, attributes=attrs, name=f"{name}__dq")
        g.insert_before(node, placeholder)
        weight = placeholder.outputs[0]
        if transposed:
            t = ir.Node("", "Transpose", [weight], attributes=[ir.AttrInt64s("perm", [1, 0])], name=f"{name}__wt")
            g.insert_before(node, t)
            weight = t.outputs[0]
        old = node.inputs[idx]
        node.replace_input_with(idx, weight)
        if old is not None and old.is_initializer() and not old.uses():
            g.initializers.pop(old.name, None)
        self.model.opset_imports.setdefault(schema.PRIVATE_DOMAIN, schema.VERSION)
        schema.register()
        rewrite_mod.rewrite(self.model)
        node.meta.pop(QWEIGHT_KEY, None)  # the graph holds the codes now (weights_to_qdq must not store them twice)
        node.meta[LOWERED_FROM_KEY] = name
        node.meta[KERNEL_KEY] = f"DequantizeLinear(weight codes) -> {node.op_type}"
        self._session = None
        return node

    def erase(self, node: ir.Node) -> None:
        self.model.graph.remove(node, safe=True)
        self._session = None

    def recompile(self) -> None:
        self._session = None

    def copy(self) -> OnnxGraph:
        other = OnnxGraph(ir.from_proto(self.to_proto()), name=self.name_, example_inputs=self.example_inputs)
        other.properties = set(self.properties)
        return other

    # --- execution -------------------------------------------------------------------------
    def to_proto(self) -> onnx.ModelProto:
        return ir.to_proto(self.model)

    def _make_session(self, proto: onnx.ModelProto, options: Any = None):
        """A CPU session. Graph optimizations are off by default: ORT's QDQ fusions turn Q/DQ pairs into
        int8 kernels that requantize, which is deployment, not the simulation this graph stands for."""
        import onnxruntime as ort

        opts = options or ort.SessionOptions()
        if options is None:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = opts.intra_op_num_threads or torch.get_num_threads()
        opts.log_severity_level = 3
        if any(o.domain == _CUSTOM_DOMAIN for o in proto.opset_import):
            from qgraph.export.ort_ops import session_options

            session_options(opts)  # registers ai.qgraph::BiQGEMM (qgraph's kernel) with onnxruntime
        return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def _feed(self, inputs: tuple) -> dict[str, np.ndarray]:
        names = [v.name for v in self.input_nodes()]
        if len(inputs) != len(names):
            raise CalibrationError(f"the ONNX model takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}")
        return {n: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
                for n, x in zip(names, inputs)}

    def __call__(self, *inputs: Any) -> Any:
        feed = self._feed(inputs)
        try:
            if self._session is None:
                self._session = self._make_session(self.to_proto())
            outs = [torch.from_numpy(o) for o in self._session.run(None, feed)]
        except Exception as e:
            if "onnxruntime" not in type(e).__module__:
                raise
            raise ExportError(f"onnxruntime could not run {self.name_}: {str(e).splitlines()[0][:300]}") from None
        return outs[0] if len(outs) == 1 else tuple(outs)

    def node_values(self, inputs: tuple) -> tuple[dict[str, torch.Tensor], list[str]]:
        proto = self.to_proto()
        existing = {o.name for o in proto.graph.output}
        wanted: dict[str, str] = {}
        order = []
        for node in self.model.graph:
            name = node.meta.get(LOWERED_FROM_KEY, node.name)
            if not name or not node.outputs or not node.outputs[0].name:
                continue
            order.append(name)
            wanted[node.outputs[0].name] = name
            if node.outputs[0].name not in existing:
                proto.graph.output.append(onnx.ValueInfoProto(name=node.outputs[0].name))
        session = self._make_session(proto)
        results = session.run(None, self._feed(inputs))
        values = {}
        for out, arr in zip(session.get_outputs(), results):
            if out.name in wanted and isinstance(arr, np.ndarray) and np.issubdtype(arr.dtype, np.floating):
                values[wanted[out.name]] = torch.from_numpy(arr)
        return values, order

    def collect(self, requests: list[tuple[ir.Node, int]], batches, on_value) -> int:
        """Run ``batches`` with onnxruntime, handing input ``idx`` of each requested node to ``on_value``."""
        proto = self.to_proto()
        wanted = [self.inputs(node)[idx].name for node, idx in requests]
        existing = {o.name for o in proto.graph.output}
        for name in dict.fromkeys(wanted):
            if name not in existing:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
        session = self._make_session(proto)
        count = 0
        for batch in batches:
            results = dict(zip([o.name for o in session.get_outputs()], session.run(None, self._feed(batch))))
            for i, name in enumerate(wanted):
                on_value(i, torch.from_numpy(results[name]))
            count += 1
        return count

    def save(self, path: str | Path, *, external_data: bool = False) -> Path:
        path = Path(path)
        proto = self.to_proto()
        if external_data:
            onnx.save_model(proto, str(path), save_as_external_data=True, location=path.name + ".data")
        else:
            onnx.save_model(proto, str(path))
        return path

    def __str__(self) -> str:
        from qgraph.ir.printer import format_graph

        return format_graph(self)


_CUSTOM_DOMAIN = "ai.qgraph"


def _take_over(old: ir.Value, new: ir.Value) -> None:
    """Every use of ``old`` reads ``new`` instead; a graph output keeps its name (``new`` takes it over)."""
    name = old.name
    output = old.is_graph_output()
    if output:
        old.name = f"{name}__replaced"
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    if output:
        new.name = name


def _rowwise_codes(qweight: Any, *, packed: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(codes, float zero points, bits attribute) of the exporter's RowwiseGather for a row-wise UniformWeight:
    ≤ 4-bit codes two per byte like `RowwiseQuantizedEmbedding` (unpacked below opset 18, which lacks
    BitwiseAnd), the code offset folded into the zero points."""
    from qgraph.kernels.embedding import RowwiseQuantizedEmbedding

    bits = qweight.spec.bits
    mod = RowwiseQuantizedEmbedding(qweight.codes, qweight.scale, qweight.zero_point.to(qweight.scale.dtype), bits)
    zp = (mod.zero_point + float(mod.code_offset)).numpy()
    if bits > 4 or packed:
        return mod.codes.numpy(), zp, bits
    codes = (qweight.codes.to(torch.int16) + mod.code_offset).to(torch.uint8).numpy()
    return codes, zp, 8


def eval_list(text: str) -> list[str]:
    """Parse the exporter's ``"['', 'encoder', 'layer.0']"`` name-scope metadata without eval."""
    import ast

    value = ast.literal_eval(text)
    if not isinstance(value, list):
        raise ValueError(text)
    return [str(v) for v in value]


def example_inputs_for(graph: OnnxGraph, batch: int = 2) -> tuple:
    """Random example inputs from the graph's declared input types (symbolic dims → ``batch``)."""
    out = []
    for v in graph.input_nodes():
        shape = [d if isinstance(d, int) else batch for d in (v.shape or ())]
        dt = v.dtype
        if dt in (ir.DataType.INT64, ir.DataType.INT32):
            out.append(torch.ones(shape, dtype=torch.int64 if dt == ir.DataType.INT64 else torch.int32))
        else:
            out.append(torch.randn(shape))
    return tuple(out)


