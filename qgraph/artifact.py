"""Quantized-model artifacts: data only, checksummed, written atomically.

A folder holds:
- ``manifest.json``: format version, target, pipeline, per node its annotation, activation qparams and the
  layout of its quantized weight, a fingerprint of the float model, and a SHA-256 per file;
- ``weights.safetensors``: the quantized tensors (the quantization state);
- ``program.json`` + ``program.safetensors``: the lowered graph as a ``torch.export`` program (see
  `qgraph.program`), when it could be exported.

`load_artifact(DIR)` runs the stored program: it needs no source model and never imports, executes or
unpickles anything from the folder, the manifest or the current directory. Given a model (or asked to
``replay``, as ``qgraph export`` is), it checks the model's weights against the manifest's fingerprint,
re-traces it, puts the saved quantization state back and replays the passes after quantize-weights. A model
is only ever rebuilt from a bundled name (qgraph's installed code) or passed in by the caller; never from a
path the manifest names. Every failure is an `ArtifactError` naming the file and field.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qgraph.errors import ArtifactError, QGraphError
from qgraph.fingerprint import model_fingerprint
from qgraph.ir.graph_view import ANNOTATION_KEY
from qgraph.version import __version__

FORMAT = "qgraph.artifact/2"
MANIFEST, WEIGHTS = "manifest.json", "weights.safetensors"
STATE_PASSES = ("annotate", "check-target", "calibrate", "quantize-weights")
_MAX_MANIFEST_BYTES = 64 << 20


# --- the manifest schema ------------------------------------------------------------------------------
def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ArtifactError(f"{where}: {msg}")


@dataclass(frozen=True)
class FileEntry:
    """A file of the artifact and the SHA-256 of its bytes."""

    sha256: str
    bytes: int

    @classmethod
    def parse(cls, d: Any, where: str) -> FileEntry:
        _need(isinstance(d, dict), where, "must be an object with sha256 and bytes")
        sha, size = d.get("sha256"), d.get("bytes")
        _need(isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha), where,
              "sha256 must be 64 lowercase hex digits")
        _need(isinstance(size, int) and not isinstance(size, bool) and size >= 0, where,
              "bytes must be a non-negative integer")
        return cls(sha, size)


@dataclass(frozen=True)
class NodeEntry:
    """The saved quantization state of one node."""

    qualname: str
    annotation: dict
    qweight: dict | None = None
    qparams: dict | None = None

    @classmethod
    def parse(cls, d: Any, where: str) -> NodeEntry:
        _need(isinstance(d, dict), where, "must be an object")
        _need(isinstance(d.get("qualname"), str), f"{where}.qualname", "must be a string")
        _need(isinstance(d.get("annotation"), dict), f"{where}.annotation", "must be an object")
        qw = d.get("qweight")
        _need(qw is None or isinstance(qw, dict), f"{where}.qweight", "must be an object")
        qp = d.get("qparams")
        if qp is not None:
            _need(isinstance(qp, dict), f"{where}.qparams", "must be an object")
            for k, v in qp.items():
                ok = (isinstance(v, list) and len(v) == 2 and isinstance(v[0], (int, float))
                      and isinstance(v[1], int) and math.isfinite(v[0]) and v[0] > 0)
                _need(ok, f"{where}.qparams.{k}", f"must be [finite scale > 0, integer zero point], got {v!r}")
        return cls(d["qualname"], d["annotation"], qw, qp)


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``, validated field by field."""

    format: str
    target: str
    pipeline: str
    frontend: str
    nodes: dict[str, NodeEntry]
    files: dict[str, FileEntry]
    source: str | None = None
    target_source: str | None = None
    model_fingerprint: str | None = None
    program: dict | None = None
    program_note: str | None = None
    versions: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, d: Any, where: str) -> Manifest:
        _need(isinstance(d, dict), where, f"must be a JSON object, got {type(d).__name__}")
        fmt = d.get("format")
        _need(fmt == FORMAT, f"{where}: format", f"unknown artifact format {fmt!r} (this qgraph reads {FORMAT}); "
              f"lower the model again with this version")
        for key in ("target", "pipeline", "frontend"):
            _need(isinstance(d.get(key), str) and d[key].strip() != "", f"{where}: {key}", "must be a non-empty string")
        for key in ("source", "target_source", "model_fingerprint", "program_note"):
            _need(d.get(key) is None or isinstance(d[key], str), f"{where}: {key}", "must be a string or null")
        _need(d["frontend"] in ("fx", "export", "onnx"), f"{where}: frontend", "must be fx, export or onnx")
        fp = d.get("model_fingerprint")
        _need(fp is None or (len(fp) == 64 and all(c in "0123456789abcdef" for c in fp)),
              f"{where}: model_fingerprint", "must be 64 lowercase hex digits or null")
        if isinstance(d.get("program"), dict):
            _program_inputs(d["program"].get("inputs"), f"{where}: program.inputs")
        _need(isinstance(d.get("nodes"), dict), f"{where}: nodes", "must be an object")
        _need(isinstance(d.get("files"), dict), f"{where}: files", "must be an object")
        _need(d.get("program") is None or isinstance(d["program"], dict), f"{where}: program", "must be an object")
        nodes = {str(k): NodeEntry.parse(v, f"{where}: nodes.{k}") for k, v in d["nodes"].items()}
        files = {str(k): FileEntry.parse(v, f"{where}: files.{k}") for k, v in d["files"].items()}
        for name in files:
            _need("/" not in name and "\\" not in name and name not in ("", ".", ".."),
                  f"{where}: files", f"{name!r} is not a plain file name")
        _need(WEIGHTS in files, f"{where}: files", f"must list {WEIGHTS}")
        return cls(fmt, d["target"], d["pipeline"], d["frontend"], nodes, files, d.get("source"),
                   d.get("target_source"), d.get("model_fingerprint"), d.get("program"), d.get("program_note"),
                   d.get("versions") if isinstance(d.get("versions"), dict) else {})


def _program_inputs(v: Any, where: str) -> None:
    ok = isinstance(v, list) and len(v) > 0 and all(
        isinstance(i, list) and len(i) == 2 and isinstance(i[0], list) and isinstance(i[1], str)
        and i[1].startswith("torch.") and isinstance(getattr(torch, i[1][6:], None), torch.dtype)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in i[0]) for i in v)
    _need(ok, where, "must list each input as [shape (non-negative ints), dtype name]")


# --- fingerprints and hashing -------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- writing ------------------------------------------------------------------------------------------
def save_artifact(qmodel: Any, path: str | Path, *, source: str | None = None, program: bool = True) -> Path:
    """Write ``qmodel`` (a `QuantizedModel`) into the folder ``path``, replacing it whole and atomically.

    ``source``: how the model was named (informational; only a bundled name is ever used to rebuild it).
    ``program``: also store the lowered graph as a ``torch.export`` program, so the artifact runs alone.
    """
    from safetensors.torch import save_file

    from qgraph.atomic import atomic_folder
    from qgraph.ir.meta import QPARAMS_KEY, QWEIGHT_KEY
    from qgraph.quant.qweight_io import qweight_parts

    sim = qmodel.artifacts.get("simulation", qmodel.graph)
    nodes, tensors = {}, {}
    for i, node in enumerate(sim.nodes()):
        meta = sim.meta(node)
        ann = meta.get(ANNOTATION_KEY)
        if ann is None:
            continue
        entry: dict[str, Any] = {"qualname": sim.qualname(node), "annotation": ann.to_dict()}
        q = meta.get(QWEIGHT_KEY)
        if q is not None:
            entry["qweight"], parts = qweight_parts(q, f"n{i}.")
            tensors.update(parts)
        qp = meta.get(QPARAMS_KEY)
        if qp:
            entry["qparams"] = {k: [float(s), int(z)] for k, (s, z) in qp.items()}
        nodes[sim.name(node)] = entry
    with atomic_folder(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        written, program_entry, note = [WEIGHTS], None, None
        gm = getattr(qmodel, "gm", None)
        example = tuple(getattr(qmodel.graph, "example_inputs", ()) or ())
        if program and gm is not None and example:
            from qgraph.program import GRAPH_FILE, WEIGHTS_FILE, program_dynamic_shapes, save_program

            try:
                written += save_program(gm, example, tmp, dynamic_shapes=program_dynamic_shapes(qmodel.graph, example))
                program_entry = {"graph": GRAPH_FILE, "weights": WEIGHTS_FILE,
                                 "inputs": [[list(t.shape), str(t.dtype)] for t in example]}
            except QGraphError as e:
                note = str(e)
        elif program:
            note = "no lowered torch graph with example inputs to export"
        manifest = {
            "format": FORMAT, "source": source, "model_fingerprint": qmodel.artifacts.get("model_fingerprint"),
            "target": qmodel.target.name, "target_source": qmodel.target.source, "pipeline": qmodel.pipeline,
            "frontend": sim.frontend, "nodes": nodes, "program": program_entry, "program_note": note,
            "versions": {"qgraph": _version(), "torch": torch.__version__},
            "files": {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                      for name in written},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return Path(path)


def _version() -> str:
    return __version__


# --- reading ------------------------------------------------------------------------------------------
def read_manifest(path: str | Path) -> Manifest:
    """Parse and validate ``DIR/manifest.json`` (no other file is read)."""
    from qgraph.atomic import resolve

    folder = resolve(path)
    mpath = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not an artifact folder (point at the model/ folder that qgraph lower wrote)")
    if not mpath.is_file():
        raise ArtifactError(f"{folder} is not a qgraph artifact: {MANIFEST} is missing")
    if mpath.stat().st_size > _MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{mpath}: larger than {_MAX_MANIFEST_BYTES >> 20} MiB; not a manifest qgraph wrote")
    try:
        raw = json.loads(mpath.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is corrupt: {e}") from None
    except RecursionError:
        raise ArtifactError(f"{mpath} is corrupt: nested too deeply") from None
    return Manifest.parse(raw, str(mpath))


def read_artifact(path: str | Path) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """The validated manifest and quantized tensors of an artifact; every listed file's hash is checked."""
    from safetensors import safe_open

    from qgraph.atomic import resolve

    folder = resolve(path)
    manifest = read_manifest(folder)
    for name, entry in manifest.files.items():
        f = folder / name
        if not f.is_file():
            raise ArtifactError(f"{f}: listed in the manifest but missing")
        if f.stat().st_size != entry.bytes or sha256_file(f) != entry.sha256:
            raise ArtifactError(f"{f}: contents do not match the manifest's sha256 (corrupt or modified)")
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        raise ArtifactError(f"{folder / WEIGHTS} cannot be read: {e}") from None
    _check_coverage(manifest, tensors, folder)
    return manifest, tensors


def _check_coverage(manifest: Manifest, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    from qgraph.errors import SpecError
    from qgraph.pipeline import parse_pipeline
    from qgraph.quant.qweight_io import qweight_from_parts, tensor_names

    try:
        names = [p.name for p in parse_pipeline(manifest.pipeline)]
    except QGraphError as e:
        raise ArtifactError(f"{folder / MANIFEST}: pipeline: {e}") from None
    if "quantize-weights" in names and not manifest.nodes:
        raise ArtifactError(f"{folder / MANIFEST}: nodes: empty, but the pipeline quantizes weights")
    used: set[str] = set()
    for name, entry in manifest.nodes.items():
        ann = _annotation(entry, f"{folder / MANIFEST}: nodes.{name}.annotation")
        if entry.qweight is None:
            continue
        where = f"{folder / MANIFEST}: nodes.{name}.qweight"
        try:
            used |= tensor_names(entry.qweight)
            q = qweight_from_parts(entry.qweight, tensors)
        except SpecError as e:
            raise ArtifactError(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ArtifactError(f"{where}: malformed ({type(e).__name__}: {e})") from None
        _agree(ann, q, where)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ArtifactError(f"{folder / WEIGHTS}: tensor {extra[0]!r} belongs to no node of the manifest "
                            f"(nodes were removed from the manifest?)")


def _annotation(entry: NodeEntry, where: str) -> Any:
    """The node's annotation; it must parse and print back to exactly what the manifest holds."""
    from qgraph.quant.qspec import Annotation

    try:
        ann = Annotation.from_dict(entry.annotation)
        canonical = ann.to_dict()
    except (QGraphError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{where}: {e}") from None
    if json.loads(json.dumps(canonical)) != entry.annotation:
        raise ArtifactError(f"{where}: not in canonical form (missing fields or values of the wrong type)")
    return ann


def _agree(ann: Any, q: Any, where: str) -> None:
    """The annotation's weight spec and the stored weight describe the same quantization."""
    spec = ann.weight
    kind = type(q).__name__
    stored = getattr(q, "spec", None) or getattr(getattr(q, "base", None), "spec", None)
    if spec is None:
        raise ArtifactError(f"{where}: a quantized weight is stored but the annotation has no weight spec")
    if kind == "BCQWeight":
        ok = spec.scheme == "bcq" and spec.bits == q.bits
    else:
        ok = stored is not None and spec.scheme == stored.scheme and spec.bits == stored.bits and \
            spec.signed == stored.signed and spec.symmetric == stored.symmetric
    if not ok:
        raise ArtifactError(f"{where}: the stored {kind} does not match the annotation's weight spec {spec}")


def load_artifact(path: str | Path, model: nn.Module | None = None, example_inputs: tuple | None = None,
                  *, dynamic_shapes: Any = None, progress: bool = False, replay: bool = False) -> Any:
    """Rebuild the runnable quantized model saved in ``path``.

    Without ``model`` (and without ``replay``) the stored program runs as it is: nothing else is needed.
    With ``model``/``example_inputs``, or with ``replay=True`` for an artifact of a bundled model, the float
    model is re-traced and the saved state is put back on it (which `qgraph.export_onnx` needs); the model's
    weights must match the manifest's fingerprint.
    """
    from qgraph.api import QuantizedModel
    from qgraph.atomic import resolve

    folder = resolve(path)
    manifest, tensors = read_artifact(folder)
    target = _target(manifest, folder)
    if model is None and not replay and manifest.program is not None:
        return _from_program(manifest, folder, target)
    if model is None:
        model, example_inputs, dynamic_shapes = _bundled_model(manifest, folder)
    if example_inputs is None:
        raise ArtifactError("load_artifact needs example_inputs together with model")
    if manifest.model_fingerprint is not None and model_fingerprint(model) != manifest.model_fingerprint:
        raise ArtifactError(f"{folder / MANIFEST}: model_fingerprint: the model given has other weights than the "
                            f"one this artifact was made from")
    graph, ctx, passes, last = _replay_prefix(manifest, model, example_inputs, dynamic_shapes, target, progress)
    _restore(graph, manifest, tensors, ctx, folder)
    graph.properties |= {"annotated", "calibrated", "weights-quantized", "target-checked"}
    from qgraph.pass_manager import PassManager

    result = PassManager(passes[last + 1:]).run(graph, ctx) if passes[last + 1:] else None
    g = result.graph if result is not None else graph
    return QuantizedModel(g, target, manifest.pipeline, ctx.report, ctx.artifacts)


def _target(manifest: Manifest, folder: Path) -> Any:
    from qgraph.target import list_targets, load_target

    try:
        if manifest.target in list_targets():
            return load_target(manifest.target)
        if manifest.target_source and manifest.target_source.endswith(".toml"):
            return load_target(manifest.target_source)
    except QGraphError as e:
        raise ArtifactError(f"{folder / MANIFEST}: target: {e}") from None
    raise ArtifactError(f"{folder / MANIFEST}: target: {manifest.target!r} is not a shipped target and its TOML "
                        f"({manifest.target_source}) is not available")


def _from_program(manifest: Manifest, folder: Path, target: Any) -> Any:
    from safetensors.torch import load_file

    from qgraph.api import QuantizedModel
    from qgraph.ir.fx import FxGraph
    from qgraph.program import load_program

    prog = manifest.program
    gfile, wfile = prog.get("graph"), prog.get("weights")
    for key, name in (("graph", gfile), ("weights", wfile)):
        _need(isinstance(name, str) and name in manifest.files, f"{folder / MANIFEST}: program.{key}",
              "must name a file listed (and hashed) in files")
    try:
        tensors = load_file(str(folder / wfile))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        raise ArtifactError(f"{folder / wfile} cannot be read: {e}") from None
    try:
        module = load_program((folder / gfile).read_bytes(), tensors, where=str(folder))
    except QGraphError as e:
        raise ArtifactError(str(e)) from None
    report = {"layers": [{"node": e.qualname, "spec": str(e.annotation.get("weight"))}
                         for e in manifest.nodes.values() if e.qweight is not None]}
    graph = FxGraph(module, frontend=manifest.frontend, name=manifest.source or "artifact")
    return QuantizedModel(graph, target, manifest.pipeline, report, {"artifact": str(folder)})


def _bundled_model(manifest: Manifest, folder: Path) -> tuple:
    from qgraph.models.registry import BUNDLED

    if manifest.source not in BUNDLED:
        raise ArtifactError(f"{folder} was made from {manifest.source!r}, which is not a bundled model, and holds "
                            f"no runnable program: pass model= and example_inputs= (qgraph never imports code an "
                            f"artifact names)")
    from qgraph.model_source import load_model_source

    s = load_model_source(manifest.source)
    return s.module, s.example_inputs, s.dynamic_shapes


def _replay_prefix(manifest: Manifest, model: nn.Module, example_inputs: tuple, dynamic_shapes: Any, target: Any,
                   progress: bool) -> tuple:
    from qgraph.context import PassContext
    from qgraph.ir.trace import trace
    from qgraph.pass_manager import PassManager
    from qgraph.pipeline import parse_pipeline

    passes = parse_pipeline(manifest.pipeline)
    names = [p.name for p in passes]
    first = min((names.index(n) for n in STATE_PASSES if n in names), default=len(names))
    last = max((names.index(n) for n in STATE_PASSES if n in names), default=first - 1)
    graph = trace(model, tuple(example_inputs), frontend=manifest.frontend if manifest.frontend in ("fx", "export")
                  else "auto", dynamic_shapes=dynamic_shapes)
    ctx = PassContext(target=target, config={"progress": progress})
    if passes[:first]:
        graph = PassManager(passes[:first]).run(graph, ctx).graph
    return graph, ctx, passes, last


def _restore(graph: Any, manifest: Manifest, tensors: dict, ctx: Any, folder: Path) -> None:
    from qgraph.ir.meta import QPARAMS_KEY, QWEIGHT_KEY
    from qgraph.quant.qspec import Annotation
    from qgraph.quant.qweight_io import qweight_from_parts

    by_name = {graph.name(n): n for n in graph.nodes()}
    missing = [name for name in manifest.nodes if name not in by_name]
    if missing:
        raise ArtifactError(f"the artifact does not fit this model: node {missing[0]!r} is not in its graph "
                            f"(was it saved from a different model?)")
    layers = ctx.report.setdefault("layers", [])
    for name, entry in manifest.nodes.items():
        node = by_name[name]
        meta = graph.meta(node)
        try:
            meta[ANNOTATION_KEY] = Annotation.from_dict(entry.annotation)
        except (QGraphError, KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{folder / MANIFEST}: nodes.{name}.annotation: {e}") from None
        if entry.qparams:
            meta[QPARAMS_KEY] = {k: (torch.tensor(s), torch.tensor(z, dtype=torch.int32))
                                 for k, (s, z) in entry.qparams.items()}
        if entry.qweight is None:
            continue
        q = qweight_from_parts(entry.qweight, tensors)
        w = graph.param(node, "weight")
        if w is None or w.numel() != q.dequantize().numel():
            raise ArtifactError(f"the artifact does not fit this model: node {name!r} has a weight of shape "
                                f"{None if w is None else tuple(w.shape)}")
        meta[QWEIGHT_KEY] = q
        layers.append({"node": entry.qualname, "op": graph.op_type(node),
                       "spec": str(q.spec if hasattr(q, "spec") else meta[ANNOTATION_KEY].weight),
                       "rel_weight_err": float("nan"), "fp32_bytes": w.numel() * 4, "bytes": int(q.nbytes)})
