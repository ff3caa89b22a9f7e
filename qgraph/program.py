"""A lowered graph as data: a ``torch.export`` program stored as JSON plus safetensors, loaded without pickle.

`save_program` exports the lowered fx graph (its kernels are registered ops with fake kernels, so it
exports), writes the graph with torch's own serializer as JSON, and every weight and constant as one
safetensors file. `load_program` reads them back with torch's deserializer, handing it tensors (so it never
unpickles) and dropping the guard code that ``ExportedProgram.module()`` would otherwise compile, and checks
first that every call in the graph targets a registered ``torch.ops`` operator or an ``operator`` function:
a program that names anything else (``torch.load``, ``os.system``...) is refused before it is built.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qgraph.errors import ExportError

GRAPH_FILE, WEIGHTS_FILE = "program.json", "program.safetensors"
_DUNDER_OPS = {"__and__", "__or__", "__xor__", "__lshift__", "__rshift__", "__iand__", "__ior__", "__ixor__",
               "__ilshift__", "__irshift__"}


def _allowed_target(target: str) -> bool:
    """``torch.ops.<namespace>.<op>[.<overload>]`` or ``_operator.<name>``: no attribute walks beyond that."""
    parts = target.split(".")
    if parts[0] == "_operator":
        return len(parts) == 2 and parts[1].isidentifier() and not parts[1].startswith("_")
    if parts[:2] != ["torch", "ops"] or len(parts) not in (4, 5):
        return False
    ns, op, overload = parts[2], parts[3], parts[4] if len(parts) == 5 else "default"
    return (ns.isidentifier() and not ns.startswith("__") and op.isidentifier()
            and (not op.startswith("__") or op in _DUNDER_OPS) and overload.isidentifier()
            and not overload.startswith("__"))


def program_dynamic_shapes(graph: Any, args: tuple) -> tuple:
    """``Dim.AUTO`` on the batch dim and on every dim that was dynamic when the model was traced (programs and ONNX export)."""
    try:
        traced = list(graph.dynamic_dims())
    except (AttributeError, TypeError):
        traced = []
    out = []
    for i, a in enumerate(args):
        dims = (set(traced[i]) if i < len(traced) else set()) | ({0} if a.dim() > 0 else set())
        out.append({d: torch.export.Dim.AUTO for d in sorted(dims) if d < a.dim()} or None)
    return tuple(out)


def save_program(module: torch.nn.Module, example_inputs: tuple, folder: Path, *,
                 dynamic_shapes: Any = None) -> list[str]:
    """Export ``module`` and write ``program.json`` + ``program.safetensors`` into ``folder``.

    Returns the files written. Raises `ExportError` when the graph cannot be exported or stored as data.
    """
    from safetensors.torch import save_file
    from torch._export.serde.serialize import serialize

    try:
        with torch.no_grad():
            ep = torch.export.export(module, tuple(example_inputs), dynamic_shapes=dynamic_shapes, strict=False)
        art = serialize(ep, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False)
    except Exception as e:  # noqa: BLE001 - torch.export raises many types; the reason goes in the message
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"the lowered graph cannot be stored as a program: {type(e).__name__}: {first}") from None
    tensors: dict[str, torch.Tensor] = {}
    for kind, items in (("state", ep.state_dict), ("const", ep.constants)):
        for name, t in items.items():
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.is_quantized:
                raise ExportError(f"the lowered graph cannot be stored as a program: {kind} {name!r} is a "
                                  f"{type(t).__name__}, not a plain tensor")
            tag = "param" if isinstance(t, torch.nn.Parameter) else kind
            tensors[f"{tag}:{name}"] = t.detach().cpu().contiguous().clone()
    (folder / GRAPH_FILE).write_bytes(art.exported_program)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    return [GRAPH_FILE, WEIGHTS_FILE]


def _targets(graph: Any) -> list[str]:
    out = []
    for node in graph.nodes:
        target = getattr(node, "target", None)
        if isinstance(target, str):
            out.append(target)
    return out


def load_program(graph_bytes: bytes, tensors: dict[str, torch.Tensor], *, where: str = "program") -> torch.nn.Module:
    """Rebuild the runnable module from `save_program`'s files (raises `ExportError` on anything unexpected)."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass

    try:
        sep = _bytes_to_dataclass(schema.ExportedProgram, graph_bytes)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, UnicodeDecodeError) as e:
        raise ExportError(f"{where}/{GRAPH_FILE} is not a serialized program: {type(e).__name__}: {e}") from None
    bad = [t for t in _targets(sep.graph_module.graph) if not _allowed_target(t)]
    if bad:
        raise ExportError(f"{where}/{GRAPH_FILE} calls {bad[0]!r}, which is not a registered torch operator; "
                          f"refusing to build it")
    sep.guards_code = []  # Python source that module() would compile: never run code from a file
    state = {k.split(":", 1)[1]: v for k, v in tensors.items() if k.startswith("state:")}
    state |= {k.split(":", 1)[1]: torch.nn.Parameter(v, requires_grad=False) for k, v in tensors.items()
              if k.startswith("param:")}
    consts = {k.split(":", 1)[1]: v for k, v in tensors.items() if k.startswith("const:")}
    try:
        ep = ExportedProgramDeserializer().deserialize(sep, state, consts, None)
        module = ep.module()
    except Exception as e:  # noqa: BLE001 - torch's deserializer raises many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"{where}/{GRAPH_FILE} cannot be rebuilt: {type(e).__name__}: {first}") from None
    for node in module.graph.nodes:
        if node.op == "call_function" and not _is_operator(node.target):
            raise ExportError(f"{where}/{GRAPH_FILE} calls {node.target!r}, which is not a torch operator")
    return module


def _is_operator(target: Any) -> bool:
    import operator

    from torch._ops import HigherOrderOperator, OpOverload, OpOverloadPacket

    if isinstance(target, (OpOverload, OpOverloadPacket, HigherOrderOperator)):
        return True
    return getattr(operator, getattr(target, "__name__", ""), None) is target
