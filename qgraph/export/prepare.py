"""Turn a quantized model's graph into the module handed to the torch ONNX exporter.

The source is the fake-quant simulation (``qmodel.artifacts["simulation"]``, the graph as it was before the
first lower-* pass) when the model was lowered, else ``qmodel.graph``: it carries every quantized weight in
node meta and every activation fake-quant, whatever kernels the lowering picked (int8 oneDNN, weight-only
int4, BiQGEMM, ...). On a copy of it:
- fake-quant nodes (``insert-fq``) → the ``fake_quant`` marker;
- Gemm nodes holding a `BCQWeight` (and `BCQLinear` modules, when handed a lowered graph) → `BiQGEMMExport`;
- embeddings holding per-row uniform codes (and `RowwiseQuantizedEmbedding` modules) → `RowwiseGatherExport`;
- every other node holding a `UniformWeight` gets its weight from the ``dequantize_weight`` marker (integer
  codes + qparams), so no dequantized float copy of a quantized weight is exported.
Nodes that stay float in the quantized model (no quantized weight, BCQ on a Conv) are exported as they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from qgraph.errors import ExportError
from qgraph.export import markers
from qgraph.ir.meta import FQ_KEY, QWEIGHT_KEY
from qgraph.quant.bcq_weight import BCQWeight
from qgraph.quant.block_scaled import BlockScaledWeight
from qgraph.quant.qtensor import UniformWeight


@dataclass
class Prepared:
    """The module to export and what happened to each quantized node."""

    module: torch.nn.Module
    notes: list[dict] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def note(self, node: str, kind: str, detail: str = "") -> None:
        self.notes.append({"node": node, "export": kind, "detail": detail})
        self.counts[kind] = self.counts.get(kind, 0) + 1


def source_graph(qmodel):
    """The graph an export starts from: the simulation snapshot of a lowered model, else its graph."""
    sim = getattr(qmodel, "artifacts", {}).get("simulation") if hasattr(qmodel, "artifacts") else None
    graph = sim if sim is not None else getattr(qmodel, "graph", qmodel)
    if not hasattr(graph, "gm") or not hasattr(graph, "copy"):
        raise ExportError(f"export_onnx needs a qgraph.QuantizedModel (or FxGraph), got {type(qmodel).__name__}")
    return graph


def prepare(qmodel) -> Prepared:
    """A module computing what ``qmodel`` computes, with quantized parts expressed by marker ops."""
    from qgraph.kernels import BCQLinear
    from qgraph.kernels.embedding import RowwiseQuantizedEmbedding

    g = source_graph(qmodel).copy()
    out = Prepared(g.gm)
    changed = False
    for node in list(g.nodes()):
        mod = g.module_of(node)
        name = _lowered_name(g, node) if isinstance(mod, (BCQLinear, RowwiseQuantizedEmbedding)) else g.qualname(node)
        if node.op == "call_function" and node.target in markers.FAKE_QUANT_TARGETS:
            node.target = torch.ops.qgraph_export.fake_quant.default
            node.args = (*node.args[:5], node.name)
            out.note(name, "qdq-activation")
            changed = True
        elif isinstance(mod, BCQLinear):
            if mod.mode != "exact":
                out.note(name, "note", f"lowered with mode={mod.mode!r}; the ONNX op computes the exact product")
            _swap_module(g, node, markers.BiQGEMMExport(mod.bcq_weight(), mod.bias, name))
            out.note(name, "biqgemm", f"{mod.bits}-bit, group {mod.group_size}")
            changed = True
        elif isinstance(mod, RowwiseQuantizedEmbedding):
            zp = mod.zero_point + float(mod.code_offset)
            _swap_module(g, node, markers.RowwiseGatherExport(mod.codes, mod.scale, zp, mod.bits, mod.dim, name))
            out.note(name, "rowwise-gather", f"{mod.bits}-bit rows")
            changed = True
        elif QWEIGHT_KEY in g.meta(node):
            changed |= _quantized_weight(g, node, g.meta(node)[QWEIGHT_KEY], out)
        elif mod is not None and type(mod).__module__.startswith("qgraph.kernels"):
            raise ExportError(f"node {name!r} is a lowered {type(mod).__name__} and the model has no simulation "
                              f"snapshot to export instead; export the QuantizedModel returned by qgraph.quantize "
                              f"(its artifacts['simulation'] holds the graph before lowering)")
    if changed:
        g.gm.graph.eliminate_dead_code()
        g.recompile()
    _drop_unused_tensors(g.gm)
    _no_inplace(g.gm)
    return out


def check_qweight(name: str, q) -> None:
    """Reject corrupt quantized weights before the (slow) torch export."""
    hint = "the quantized model is corrupt; re-run quantize-weights"
    if isinstance(q, BCQWeight):
        if not torch.isfinite(q.alpha).all() or (q.offset is not None and not torch.isfinite(q.offset).all()):
            raise ExportError(f"{name}: BCQ alpha / offset holds non-finite values; {hint}")
        return
    if isinstance(q, UniformWeight):
        scale = torch.as_tensor(q.scale)
        if not torch.isfinite(scale).all() or (scale <= 0).any():
            raise ExportError(f"{name}: weight scales must be finite and > 0; {hint}")
        lo, hi = q.spec.qmin, q.spec.qmax
        codes = q.codes
        if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
            raise ExportError(f"{name}: weight codes outside [{lo}, {hi}] ({int(codes.min())}..{int(codes.max())}) "
                              f"for {q.spec}; {hint}")


def _quantized_weight(g, node: fx.Node, q, out: Prepared) -> bool:
    name, op = g.qualname(node), g.op_type(node)
    if isinstance(q, BlockScaledWeight):  # exported as its exact BCQ form (ai.qgraph::BiQGEMM)
        q = q.to_bcq()
    check_qweight(name, q)
    if not g.meta(node).get(FQ_KEY):
        raise ExportError(
            f"node {name!r} has a quantized weight but the graph still computes with the float one; add "
            f"'insert-fq' (or a lower-* pass) to the pipeline so the model computes what gets exported")
    if isinstance(q, BCQWeight):
        w = g.param(node, "weight")
        x_w_t = op == "Gemm" and "addmm" not in str(node.target)  # addmm holds Wᵀ: x @ W, not x @ Wᵀ
        if x_w_t and w is not None and w.dim() == 2 and tuple(w.shape) == tuple(q.shape):
            module = markers.BiQGEMMExport(q, g.param(node, "bias"), name)
            _replace(g, node, module, "biqgemm", _activation(g, node))
            out.note(name, "biqgemm", f"{q.bits}-bit, group {q.group_size}")
            return True
        out.note(name, "float", f"BCQ on {op} has no ONNX form; exported as its dequantized float weight")
        return False
    if not isinstance(q, UniformWeight):
        raise ExportError(f"node {name!r} holds a {type(q).__name__}, which the ONNX exporter does not know; "
                          f"quantize it with a uniform or BCQ spec")
    spec = q.spec
    if op == "Gather" and spec.granularity == "channel" and spec.axis == 0 and _plain_embedding(g, node):
        codes, zp, bits = q.codes, q.zero_point.to(torch.float32), spec.bits
        if bits <= 4:
            lo = spec.qmin
            codes = (q.codes.to(torch.int16) - lo).to(torch.uint8)
            codes = _pack_nibbles(codes)
            zp = zp - lo
        module = markers.RowwiseGatherExport(codes, q.scale, zp, bits, q.codes.shape[1], name)
        _replace(g, node, module, "rowwise", [g.inputs(node)[0]])
        out.note(name, "rowwise-gather", f"{bits}-bit rows")
        return True
    args = (q.codes, q.scale, q.zero_point, spec.granularity, spec.axis, spec.group_size or 0, spec.bits, name)
    if node.op == "call_module":
        inner = g.module_of(node)
        module = markers.DequantizedWeightCall(inner, *args)
        _swap_module(g, node, module)
    else:
        idx = _weight_arg_index(g, node)
        old = node.args[idx]
        gg = g.gm.graph
        with gg.inserting_before(node):
            consts = [gg.get_attr(g.constant_attr(f"{g.name(node)}_{part}", t))
                      for part, t in (("codes", q.codes), ("scale", q.scale.to(torch.float32)),
                                      ("zero_point", q.zero_point))]
            dq = gg.call_function(torch.ops.qgraph_export.dequantize_weight.default, (*consts, *args[3:]))
        node.args = tuple(dq if i == idx else a for i, a in enumerate(node.args))
        if isinstance(old, fx.Node) and not old.users:
            gg.erase_node(old)
    out.note(name, "qdq-weight", f"int{spec.bits} {spec.granularity}")
    return True


def _lowered_name(g, node: fx.Node) -> str:
    """The qualname of the node a lower-* pass replaced (its module call has a generated name)."""
    from qgraph.ir.fx import _clean_module_path
    from qgraph.lowering import LOWERED_FROM_KEY

    stack = node.meta.get("nn_module_stack")
    path = _clean_module_path(list(stack.values())[-1][0]) if stack else ""
    return path or str(node.meta.get(LOWERED_FROM_KEY, node.target))


def _activation(g, node: fx.Node) -> list[fx.Node]:
    return [g.inputs(node)[0]]


def _weight_arg_index(g, node: fx.Node) -> int:
    if "addmm" in str(node.target):
        return 2
    idx = g._const_arg_index(node, "weight")
    if idx is None or idx >= len(node.args) or not isinstance(node.args[idx], fx.Node):
        raise ExportError(f"cannot find the weight argument of {g.op_type(node)} node {node.name!r}")
    return idx


def _plain_embedding(g, node: fx.Node) -> bool:
    if node.op == "call_module":
        mod = g.module_of(node)
        return isinstance(mod, torch.nn.Embedding) and mod.max_norm is None
    return node.op == "call_function" and "embedding" in str(node.target) and len(g.inputs(node)) == 1


def _pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    if u.shape[-1] % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def _replace(g, node: fx.Node, module: torch.nn.Module, suffix: str, inputs: list[fx.Node]) -> None:
    if node.op == "call_module":
        _swap_module(g, node, module)
    else:
        g.replace_with_module(node, module, f"{g.name(node)}_{suffix}", inputs=inputs)


def _no_inplace(gm: torch.nn.Module) -> None:
    """In-place activations (``ReLU6(inplace=True)``) make the exporter functionalize and decompose them, which
    costs seconds per model under dynamic shapes; the out-of-place forms translate directly."""
    for mod in gm.modules():
        if getattr(mod, "inplace", False) is True:
            mod.inplace = False


def _swap_module(g, node: fx.Node, module: torch.nn.Module) -> None:
    """Put ``module`` where ``node``'s module was (the call keeps its arguments)."""
    g.gm.set_submodule(node.target, module)


def _drop_unused_tensors(gm: torch.nn.Module) -> None:
    """Delete parameters / buffers no node refers to any more (the float weights that were replaced)."""
    nodes = list(gm.graph.nodes)
    used_mods = {n.target for n in nodes if n.op == "call_module"}
    used_attrs = {n.target for n in nodes if n.op == "get_attr"}
    tensors = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    for fqn, _ in tensors:
        if fqn in used_attrs or any(fqn.startswith(m + ".") for m in used_mods):
            continue
        owner, _, leaf = fqn.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        if hasattr(mod, leaf):
            delattr(mod, leaf)
