"""Quantized-model artifacts: ``manifest.json`` + ``weights.safetensors``, no pickle.

The manifest records the model source, target, pipeline, and per node its annotation, activation
qparams and the layout of its quantized weight; the safetensors file holds the quantized tensors.
Loading re-traces the model from its source (a bundled model, or the module the caller passes),
puts the saved quantization state back on the same nodes, and replays the pipeline's passes after
quantize-weights (insert-fq, lowering, dce, verify). Nothing in the files is executed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qgraph.errors import ExportError
from qgraph.ir.graph_view import ANNOTATION_KEY

FORMAT = "qgraph.artifact/1"
STATE_PASSES = ("annotate", "check-target", "calibrate", "quantize-weights")


def save_artifact(qmodel: Any, path: str | Path, *, source: str | None = None) -> Path:
    """Write the quantization state of ``qmodel`` (a `QuantizedModel`) into the folder ``path``."""
    from safetensors.torch import save_file

    from qgraph.passes.calibrate import QPARAMS_KEY
    from qgraph.passes.quantize_weights import QWEIGHT_KEY
    from qgraph.quant.bcq_weight import BCQWeight
    from qgraph.quant.multipoint import MultipointWeight

    sim = qmodel.artifacts.get("simulation", qmodel.graph)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    nodes, tensors = {}, {}
    for i, node in enumerate(sim.nodes()):
        meta = sim.meta(node)
        ann = meta.get(ANNOTATION_KEY)
        if ann is None:
            continue
        entry: dict[str, Any] = {"qualname": sim.qualname(node), "annotation": ann.to_dict()}
        q = meta.get(QWEIGHT_KEY)
        prefix = f"n{i}."
        if isinstance(q, BCQWeight):
            entry["qweight"] = {"kind": "bcq", "prefix": prefix, "manifest": q.manifest()}
            tensors.update(q.tensors(prefix))
        elif isinstance(q, MultipointWeight):
            entry["qweight"] = {"kind": "multipoint", "prefix": prefix, "manifest": q.manifest()}
            tensors.update(q.tensors(prefix))
        elif q is not None:
            entry["qweight"] = {"kind": "uniform", "prefix": prefix, "spec": q.spec.to_dict()}
            tensors.update({prefix + "codes": q.codes, prefix + "scale": q.scale, prefix + "zero_point": q.zero_point})
        qp = meta.get(QPARAMS_KEY)
        if qp:
            entry["qparams"] = {k: [float(s), int(z)] for k, (s, z) in qp.items()}
        nodes[sim.name(node)] = entry
    manifest = {"format": FORMAT, "source": source, "target": qmodel.target.name,
                "target_source": qmodel.target.source, "pipeline": qmodel.pipeline, "frontend": sim.frontend,
                "nodes": nodes}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / "weights.safetensors"))
    return out


def load_artifact(path: str | Path, model: nn.Module | None = None, example_inputs: tuple | None = None,
                  *, dynamic_shapes: Any = None, progress: bool = False) -> Any:
    """Rebuild the runnable quantized model saved in ``path``.

    ``model``/``example_inputs``: the float model to apply it to; optional when the artifact's source
    is a bundled model, which is then loaded from the installed package.
    """
    from safetensors import safe_open

    from qgraph.api import QuantizedModel
    from qgraph.context import PassContext
    from qgraph.ir.trace import trace
    from qgraph.pass_manager import PassManager
    from qgraph.pipeline import parse_pipeline
    from qgraph.target import load_target

    folder = Path(path)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except FileNotFoundError:
        raise ExportError(f"{folder} is not a qgraph artifact: manifest.json is missing") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{folder}/manifest.json is corrupt: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{folder}: unknown artifact format {manifest.get('format')!r} (expected {FORMAT})")
    if model is None:
        from qgraph.models.registry import BUNDLED

        src = manifest.get("source")
        if src not in BUNDLED:
            raise ExportError(f"{folder} was made from {src!r}, which is not a bundled model: pass model= and "
                              f"example_inputs= to load_artifact")
        from qgraph.model_source import load_model_source

        s = load_model_source(src)
        model, example_inputs, dynamic_shapes = s.module, s.example_inputs, s.dynamic_shapes
    if example_inputs is None:
        raise ExportError("load_artifact needs example_inputs together with model")
    try:
        with safe_open(str(folder / "weights.safetensors"), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as e:
        raise ExportError(f"{folder}/weights.safetensors cannot be read: {e}") from None
    try:
        target = load_target(manifest["target"])
    except Exception:
        target = load_target(manifest["target_source"])
    passes = parse_pipeline(manifest["pipeline"])
    names = [p.name for p in passes]
    first = min((names.index(n) for n in STATE_PASSES if n in names), default=len(names))
    last = max((names.index(n) for n in STATE_PASSES if n in names), default=first - 1)
    graph = trace(model, tuple(example_inputs), frontend=manifest.get("frontend", "auto"),
                  dynamic_shapes=dynamic_shapes)
    ctx = PassContext(target=target, config={"progress": progress})
    if passes[:first]:
        graph = PassManager(passes[:first]).run(graph, ctx).graph
    _restore(graph, manifest["nodes"], tensors, ctx)
    graph.properties |= {"annotated", "calibrated", "weights-quantized", "target-checked"}
    result = PassManager(passes[last + 1:]).run(graph, ctx) if passes[last + 1:] else None
    g = result.graph if result is not None else graph
    return QuantizedModel(g, target, manifest["pipeline"], ctx.report, ctx.artifacts)


def _restore(graph: Any, nodes: dict, tensors: dict, ctx: Any) -> None:
    from qgraph.passes.calibrate import QPARAMS_KEY
    from qgraph.passes.quantize_weights import QWEIGHT_KEY
    from qgraph.quant.bcq_weight import BCQWeight
    from qgraph.quant.multipoint import MultipointWeight
    from qgraph.quant.qspec import Annotation, QSpec
    from qgraph.quant.qtensor import UniformWeight

    by_name = {graph.name(n): n for n in graph.nodes()}
    missing = [name for name in nodes if name not in by_name]
    if missing:
        raise ExportError(f"the artifact does not fit this model: node {missing[0]!r} is not in its graph "
                          f"(was it saved from a different model?)")
    layers = ctx.report.setdefault("layers", [])
    for name, entry in nodes.items():
        node = by_name[name]
        meta = graph.meta(node)
        meta[ANNOTATION_KEY] = Annotation.from_dict(entry["annotation"])
        if "qparams" in entry:
            meta[QPARAMS_KEY] = {k: (torch.tensor(s), torch.tensor(z, dtype=torch.int32))
                                 for k, (s, z) in entry["qparams"].items()}
        qw = entry.get("qweight")
        if qw is None:
            continue
        p = qw["prefix"]
        if qw["kind"] == "bcq":
            q = BCQWeight.from_parts(qw["manifest"], tensors, prefix=p)
        elif qw["kind"] == "multipoint":
            q = MultipointWeight.from_parts(qw["manifest"], tensors, prefix=p)
        else:
            q = UniformWeight(tensors[p + "codes"], tensors[p + "scale"], tensors[p + "zero_point"],
                              QSpec.from_dict(qw["spec"]))
        w = graph.param(node, "weight")
        if w is None or w.numel() != q.dequantize().numel():
            raise ExportError(f"the artifact does not fit this model: node {name!r} has a weight of shape "
                              f"{None if w is None else tuple(w.shape)}")
        meta[QWEIGHT_KEY] = q
        layers.append({"node": entry["qualname"], "op": graph.op_type(node), "spec": str(q.spec if hasattr(q, "spec")
                       else meta[ANNOTATION_KEY].weight), "rel_weight_err": float("nan"),
                       "fp32_bytes": w.numel() * 4, "bytes": int(q.nbytes)})
