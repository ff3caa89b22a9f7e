"""The torch.fx adapter: `FxGraph` wraps a GraphModule from `symbolic_trace` or `torch.export`."""
from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from qgraph.ir import ops
from qgraph.ir.graph_view import KERNELS, MODULE_KERNELS
from qgraph.ir.meta import KERNEL_KEY, LOWERED_FROM_KEY

_COMPUTE = ("call_module", "call_function", "call_method")
# Positional index of BatchNorm constants in the aten / functional forms.
_BN_ARGS = {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4}
_BN_EPS_ARG = {"batch_norm": 7, "_native_batch_norm_legit_no_training": 6}
_GUARD_MODULES = ("_guards_fn",)


class FxGraph:
    """A `GraphView` over a `torch.fx.GraphModule`.

    ``frontend`` is ``"fx"`` (symbolic_trace: layers are ``call_module`` nodes) or ``"export"``
    (torch.export: ATen ``call_function`` nodes with ``get_attr`` constants).
    """

    ir = "fx"
    live_collect = True  # taps run inside the forward: weights swapped by a tap affect the rest of the run

    def __init__(self, gm: fx.GraphModule, *, frontend: str, example_inputs: tuple = (), name: str = "model"):
        self.gm = gm
        self.frontend = frontend
        self.example_inputs = tuple(example_inputs)
        self.name_ = name
        self.properties: set[str] = set()

    # --- structure -------------------------------------------------------------------------
    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def nodes(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op in _COMPUTE and not self._is_guard(n)]

    def input_nodes(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "placeholder"]

    def output_node(self) -> fx.Node:
        return next(n for n in reversed(self.gm.graph.nodes) if n.op == "output")

    def find(self, name: str) -> fx.Node:
        for n in self.gm.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def _is_guard(self, node: fx.Node) -> bool:
        return node.op == "call_module" and node.target in _GUARD_MODULES

    def module_of(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def op_type(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return ops.canonical_module_name(self.gm.get_submodule(node.target))
        if node.op == "call_function":
            return ops.canonical_function_name(node.target)
        if node.op == "call_method":
            return ops.METHOD_OPS.get(node.target, f"method::{node.target}")
        return {"placeholder": "Input", "output": "Output", "get_attr": "Constant"}[node.op]

    def name(self, node: fx.Node) -> str:
        return node.name

    def qualname(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return str(node.target)
        stack = node.meta.get("nn_module_stack")
        if stack:
            path = _clean_module_path(list(stack.values())[-1][0])
            if path:
                return path
        return node.name

    def inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a.op != "get_attr"]

    def producers(self, node: fx.Node) -> list[fx.Node | None]:
        """The compute node behind each tensor input (None for graph inputs)."""
        return [a if a.op in _COMPUTE else None for a in self.inputs(node)]

    def users(self, node: fx.Node) -> list[fx.Node]:
        return list(node.users)

    def meta(self, node: fx.Node) -> dict[str, Any]:
        return node.meta

    def attribute(self, node: fx.Node, name: str, default: Any = None) -> Any:
        op = self.op_type(node)
        mod = self.module_of(node)
        if op == "BatchNormalization" and name in ("epsilon", "training_mode"):
            if mod is not None:
                training = mod.training or mod.running_var is None
                return int(training) if name == "training_mode" else float(mod.eps)
            packet = getattr(node.target, "overloadpacket", None)  # aten batch_norm forms only
            if packet is None:
                return default
            fn = packet.__name__
            if name == "training_mode":
                return int(bool(self.literal_arg(node, 5, False))) if fn == "batch_norm" else 0
            idx = _BN_EPS_ARG.get(fn)
            return float(self.literal_arg(node, idx, 1e-5)) if idx is not None else default
        if op == "Gemm" and name == "transB":
            return {"nk": 1, "kn": 0}.get(self.weight_layout(node), default)
        if mod is not None:
            value = getattr(mod, name, default)
            return default if isinstance(value, (torch.Tensor, nn.Module)) else value
        return node.kwargs.get(name, default)

    def _target_name(self, node: fx.Node) -> str:
        return str(getattr(node.target, "__name__", node.target)) if node.op == "call_function" else ""

    def is_linear(self, node: fx.Node) -> bool:
        if self.op_type(node) != "Gemm":
            return False
        mod = self.module_of(node)
        linear = isinstance(mod, nn.Linear) if mod is not None else (
            node.op == "call_function" and (node.target is F.linear or "aten.linear" in str(node.target)))
        w = self.param(node, "weight")
        return linear and w is not None and w.dim() == 2

    def is_embedding(self, node: fx.Node) -> bool:
        if self.op_type(node) != "Gather":
            return False
        mod = self.module_of(node)
        if mod is not None:
            plain = isinstance(mod, nn.Embedding) and mod.max_norm is None
        else:
            plain = node.op == "call_function" and "embedding" in str(node.target) and len(self.inputs(node)) == 1
        w = self.param(node, "weight")
        return plain and w is not None and w.dim() == 2

    def weight_layout(self, node: fx.Node) -> str | None:
        op = self.op_type(node)
        w = self.param(node, "weight")
        if w is None:
            return None
        if op == "Conv":
            return "nk"
        if w.dim() != 2 or op not in ("Gemm", "MatMul"):
            return None
        if op == "Gemm":
            return "kn" if node.op == "call_function" and "addmm" in str(node.target) else "nk"
        return "kn"

    # --- constants -------------------------------------------------------------------------
    def _const_arg_index(self, node: fx.Node, role: str) -> int | None:
        op = self.op_type(node)
        if op == "BatchNormalization":
            return _BN_ARGS.get(role)
        if op == "Gemm" and "addmm" in str(node.target):  # addmm(bias, x, weight[in, out])
            return {"weight": 2, "bias": 0}.get(role)
        if role == "weight":
            return ops.WEIGHT_INPUT_INDEX.get(op)
        if role == "bias":
            return ops.BIAS_INPUT_INDEX.get(op)
        return None

    def param(self, node: fx.Node, role: str) -> torch.Tensor | None:
        if node.op == "call_module":
            value = getattr(self.gm.get_submodule(node.target), role, None)
            return value if isinstance(value, torch.Tensor) else None
        if node.op != "call_function":
            return None
        idx = self._const_arg_index(node, role)
        if idx is None or idx >= len(node.args):
            return None
        arg = node.args[idx]
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            return _get_attr(self.gm, arg.target)
        return None

    def set_param(self, node: fx.Node, role: str, value: torch.Tensor) -> None:
        value = value.detach()
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            if isinstance(getattr(mod, role, None), nn.Parameter) or role in ("weight", "bias"):
                setattr(mod, role, nn.Parameter(value, requires_grad=False))
            else:
                setattr(mod, role, value)
            return
        idx = self._const_arg_index(node, role)
        if idx is None:
            raise KeyError(f"{self.op_type(node)} node {node.name} has no constant input {role!r}")
        args = list(node.args)
        while len(args) <= idx:
            args.append(None)
        arg = args[idx]
        if isinstance(arg, fx.Node) and arg.op == "get_attr" and len(arg.users) == 1:
            _set_attr(self.gm, arg.target, value)
            return
        attr = self._fresh_attr(f"{node.name}_{role}")
        _set_attr(self.gm, attr, value)
        with self.gm.graph.inserting_before(node):
            args[idx] = self.gm.graph.get_attr(attr)
        node.args = tuple(args)

    def shares_weight(self, node: fx.Node) -> bool:
        w = self.param(node, "weight")
        if w is None:
            return False
        ptr = w.data_ptr()
        return sum(1 for n in self.nodes() if (p := self.param(n, "weight")) is not None and p.data_ptr() == ptr) > 1

    def constant_attr(self, name_hint: str, value: torch.Tensor) -> str:
        """Register a new constant on the module and return its attribute name."""
        attr = self._fresh_attr(name_hint)
        _set_attr(self.gm, attr, value)
        return attr

    def _fresh_attr(self, hint: str) -> str:
        base = "".join(c if c.isalnum() or c == "_" else "_" for c in hint)
        name, i = base, 0
        while hasattr(self.gm, name):
            i += 1
            name = f"{base}_{i}"
        return name

    def literal_arg(self, node: fx.Node, index: int, default: Any = None) -> Any:
        return node.args[index] if index < len(node.args) else default

    # --- shapes ----------------------------------------------------------------------------
    def shape(self, node: fx.Node) -> tuple | None:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return tuple(d if isinstance(d, int) else str(d) for d in val.shape)
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            return tuple(tm.shape)
        return None

    def dynamic_dims(self) -> list[set[int]]:
        """Per graph input, the dims that may differ from the example (symbolic in the trace)."""
        out = []
        for node, example in zip(self.input_nodes(), self.example_inputs):
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                out.append({i for i, d in enumerate(val.shape) if not isinstance(d, int)})
            else:
                out.append({0} if isinstance(example, torch.Tensor) and example.dim() > 0 else set())
        return out

    def dtype(self, node: fx.Node) -> torch.dtype | None:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val.dtype
        tm = node.meta.get("tensor_meta")
        return getattr(tm, "dtype", None)

    def propagate_shapes(self, *inputs: Any) -> None:
        """Record output shapes/dtypes in node meta (``tensor_meta``) by running the graph once."""
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(self.gm).propagate(*(inputs or self.example_inputs))

    # --- edits -----------------------------------------------------------------------------
    def wrap_input(self, node: fx.Node, idx: int, target: Any, extra_args: tuple = ()) -> fx.Node:
        """Insert ``target(producer, *extra_args)`` between input ``idx`` of ``node`` and its producer."""
        producer = self.inputs(node)[idx]
        with self.gm.graph.inserting_before(node):
            new = self.gm.graph.call_function(target, (producer, *extra_args))
        new.meta.update({k: v for k, v in producer.meta.items() if k in ("val", "tensor_meta")})
        node.replace_input_with(producer, new)
        return new

    def wrap_output(self, node: fx.Node, target: Any, extra_args: tuple = ()) -> fx.Node:
        """Insert ``target(node, *extra_args)`` after ``node``; every reader of ``node`` then reads it."""
        users = list(node.users)
        with self.gm.graph.inserting_after(node):
            new = self.gm.graph.call_function(target, (node, *extra_args))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")})
        for user in users:
            user.replace_input_with(node, new)
        return new

    def replace_with_module(self, node: fx.Node, module: nn.Module, name_hint: str,
                            inputs: list[fx.Node] | None = None) -> fx.Node:
        """Swap ``node`` for a call of ``module`` on ``inputs`` (default: its first tensor input)."""
        args = inputs if inputs is not None else self.inputs(node)[:1]
        name = self._fresh_attr(name_hint)
        self.gm.add_submodule(name, module)
        with self.gm.graph.inserting_before(node):
            new = self.gm.graph.call_module(name, tuple(args))
        new.meta.update({k: v for k, v in node.meta.items()})
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)
        return new

    def eliminate_dead_code(self) -> int:
        """Erase side-effect-free nodes nobody uses and the submodules/constants left orphaned; return
        how many nodes and stored tensors went away."""
        gm = self.gm
        before = len(gm.graph.nodes)

        def impure(node: fx.Node) -> bool:
            return self._is_guard(node) or node.is_impure()

        gm.graph.eliminate_dead_code(is_impure_node=impure)
        removed = before - len(gm.graph.nodes)
        tensors = _stored_tensors(gm)
        gm.delete_all_unused_submodules()
        used = {str(n.target).split(".")[0] for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
        for store in (gm._parameters, gm._buffers):
            for name in [k for k in store if k not in used]:
                del store[name]
        freed = tensors - _stored_tensors(gm)
        if removed or freed:
            self.recompile()
        return removed + freed

    def replace_all_uses(self, old: fx.Node, new: fx.Node) -> None:
        old.replace_all_uses_with(new)

    def replace_node(self, old: fx.Node, new: fx.Node) -> None:
        # ops returning a tuple (_native_batch_norm_legit_no_training: out, mean, invstd) are read through getitem
        for user in list(old.users):
            if user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0:
                user.replace_all_uses_with(new)
                self.gm.graph.erase_node(user)
        old.replace_all_uses_with(new)
        self.gm.graph.erase_node(old)

    def scale_input(self, nodes: list[fx.Node], idx: int, factor: torch.Tensor) -> fx.Node:
        producer = self.inputs(nodes[0])[idx]
        attr = self.constant_attr(f"{nodes[0].name}_input_scale", factor.detach())
        with self.gm.graph.inserting_before(nodes[0]):
            const = self.gm.graph.get_attr(attr)
            mul = self.gm.graph.call_function(torch.mul, (producer, const))
        mul.meta.update({k: v for k, v in producer.meta.items() if k in ("val", "tensor_meta")})
        for n in nodes:
            n.replace_input_with(producer, mul)
        return mul

    def supports_kernel(self, kernel: str) -> bool:
        return kernel in KERNELS or kernel in MODULE_KERNELS

    def replace_with_kernel(self, node: fx.Node, kernel: str, qweight: Any, *, bias: torch.Tensor | None = None,
                            **options: Any) -> fx.Node:
        if kernel == "biqgemm":
            from qgraph.kernels import BCQLinear

            module = BCQLinear(qweight, bias, mode=options.get("mode", "exact"))
            new = self.replace_with_module(node, module, f"{node.name}_biqgemm")
            new.meta[KERNEL_KEY] = module.layout
        elif kernel == "rowwise_gather":
            from qgraph.kernels.embedding import RowwiseQuantizedEmbedding

            module = RowwiseQuantizedEmbedding(qweight.codes, qweight.scale,
                                               qweight.zero_point.to(qweight.scale.dtype), qweight.spec.bits)
            ids = self.inputs(node)[0]
            new = self.replace_with_module(node, module, f"{node.name}_rowwise", inputs=[ids])
            new.meta[KERNEL_KEY] = type(module).__name__
        else:
            raise KeyError(f"the fx adapter has no kernel {kernel!r}; it builds {', '.join(KERNELS)}")
        new.meta[LOWERED_FROM_KEY] = node.name
        return new

    def erase(self, node: fx.Node) -> None:
        self.gm.graph.erase_node(node)

    def recompile(self) -> None:
        self.gm.graph.lint()
        self.gm.recompile()

    def copy(self) -> FxGraph:
        """A deep copy (module, constants and node meta)."""
        other = FxGraph(copy.deepcopy(self.gm), frontend=self.frontend, example_inputs=self.example_inputs,
                        name=self.name_)
        other.properties = set(self.properties)
        return other

    # --- execution / printing ----------------------------------------------------------------
    def __call__(self, *inputs: Any) -> Any:
        return self.gm(*inputs)

    def node_values(self, inputs: tuple) -> tuple[dict[str, torch.Tensor], list[str]]:
        rec = _Recorder(self.gm)
        with torch.no_grad():
            rec.run(*inputs)
        order = [n.meta.get(LOWERED_FROM_KEY, n.name) for n in self.gm.graph.nodes]
        return rec.values, order

    def local_values(self, inputs: tuple, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Outputs of the lowered nodes (by the name of the node each stands for), each computed from the
        ``reference`` values of its inputs (a simulation's `node_values`) where those exist with the same shape
        and dtype: a lowered node's own error, without what earlier nodes passed on."""
        rec = _Forced(self.gm, reference)
        with torch.no_grad():
            rec.run(*inputs)
        return rec.local

    def __str__(self) -> str:
        from qgraph.ir.printer import format_graph

        return format_graph(self)


class _Recorder(fx.Interpreter):
    """Runs a GraphModule node by node, keeping every float tensor output by (pre-lowering) node name."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            self.values[n.meta.get(LOWERED_FROM_KEY, n.name)] = out.detach()
        return out


class _Forced(fx.Interpreter):
    """Runs a lowered GraphModule; each lowered node is run a second time on the reference values of its inputs."""

    def __init__(self, gm: fx.GraphModule, reference: dict[str, torch.Tensor]):
        super().__init__(gm)
        self.reference, self.local = reference, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        key = n.meta.get(LOWERED_FROM_KEY)
        if key is not None and isinstance(out, torch.Tensor) and out.is_floating_point():
            def ref(a: fx.Node):
                v, r = self.env[a], self.reference.get(a.meta.get(LOWERED_FROM_KEY, a.name))
                same = isinstance(v, torch.Tensor) and isinstance(r, torch.Tensor) and r.shape == v.shape
                return r if same and r.dtype == v.dtype else v

            args, kwargs = fx.node.map_arg((n.args, n.kwargs), ref)
            self.local[key] = getattr(self, n.op)(n.target, args, kwargs).detach()
        return out


def _stored_tensors(gm: fx.GraphModule) -> int:
    return sum(1 for _ in gm.parameters()) + sum(1 for _ in gm.buffers())


def _clean_module_path(path: str) -> str:
    # torch.export records e.g. "L['self'].encoder.layer[0].attention" in some versions.
    path = path.replace("L['self'].", "").replace("L['self']", "")
    out = []
    for part in path.replace("[", ".").replace("]", "").split("."):
        if part:
            out.append(part.strip("'\""))
    return ".".join(out)


def _get_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set_attr(root: nn.Module, target: str, value: torch.Tensor) -> None:
    *path, last = target.split(".")
    owner: Any = root
    for part in path:
        owner = getattr(owner, part)
    if isinstance(getattr(owner, last, None), nn.Parameter) or isinstance(value, nn.Parameter):
        owner.register_parameter(last, nn.Parameter(value.detach(), requires_grad=False))
    elif isinstance(owner, nn.Module):
        if last in owner._buffers or not hasattr(owner, last):
            owner.register_buffer(last, value)
        else:
            setattr(owner, last, value)
    else:
        setattr(owner, last, value)


class _Tap(nn.Module):
    """Identity that hands the value flowing through it to a callback (calibration taps)."""

    def __init__(self, callback):
        super().__init__()
        self.callback = callback

    def forward(self, x):
        self.callback(x)
        return x


def _collect(graph: FxGraph, requests: list[tuple[fx.Node, int]], batches, on_value) -> int:
    """Run ``batches`` through the graph, calling ``on_value(i, tensor)`` with input ``idx`` of each
    requested ``(node, idx)``. Temporary tap nodes are removed afterwards. Returns the batch count."""
    taps = []
    try:
        for i, (node, idx) in enumerate(requests):
            producer = graph.inputs(node)[idx]
            name = graph._fresh_attr(f"_qgraph_tap_{i}")
            graph.gm.add_submodule(name, _Tap(lambda t, i=i: on_value(i, t.detach())))
            with graph.gm.graph.inserting_before(node):
                tap = graph.gm.graph.call_module(name, (producer,))
            node.replace_input_with(producer, tap)
            taps.append((tap, producer, name))
        graph.gm.recompile()
        count = 0
        with torch.no_grad():
            for batch in batches:
                graph(*batch)
                count += 1
        return count
    finally:
        for tap, producer, name in reversed(taps):  # a later tap on the same input reads the earlier one
            tap.replace_all_uses_with(producer)
            graph.gm.graph.erase_node(tap)
            delattr(graph.gm, name)
        graph.gm.recompile()


FxGraph.collect = _collect
