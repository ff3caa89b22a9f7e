"""Parity gate: the same inputs through the float model, the fake-quant simulation, the lowered torch model and
the exported ONNX model in onnxruntime, with the relative error between each pair.

Relative error is ``max|a − b| / max|b|`` over all outputs (the measure used across qgraph's tests).
`layerwise` checks activation-quantized (QDQ) exports layer by layer, which end-to-end numbers cannot do for
them: see its docstring.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
import torch
from torch.utils import _pytree

from qgraph.errors import ExportError
from qgraph.export import schema

PAIRS = (("fake_quant", "float"), ("lowered", "fake_quant"), ("onnxruntime", "lowered"),
         ("onnxruntime", "fake_quant"), ("onnxruntime", "float"))


def _leaves(out: Any) -> list[np.ndarray]:
    leaves = [t for t in _pytree.tree_leaves(out) if isinstance(t, (torch.Tensor, np.ndarray))]
    return [t.detach().cpu().float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float32)
            for t in leaves]


def rel_err(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """``max|a − b| / max|b|`` over lists of matching arrays."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise ExportError(f"outputs do not match: {[x.shape for x in a]} vs {[y.shape for y in b]}")
    num = max((float(np.abs(x.astype(np.float64) - y).max()) if x.size else 0.0) for x, y in zip(a, b))
    den = max((float(np.abs(y).max()) if y.size else 0.0) for y in b)
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def uses_custom_ops(path: str | os.PathLike) -> bool:
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises protobuf/IO errors of many types
        raise ExportError(f"{path} is not a readable ONNX file: {e}") from None
    return any(o.domain == schema.DOMAIN for o in proto.opset_import)


def session(path: str | os.PathLike, options=None, disabled_optimizers: tuple[str, ...] = ()):
    """An onnxruntime CPU session for an exported file with `session_options` (custom ops registered when the
    file uses them)."""
    import onnxruntime as ort

    from qgraph.export.ort_ops import session_options

    so = session_options(options, custom_ops=uses_custom_ops(path))
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(disabled_optimizers))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ExportError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None


def run_onnx(path_or_session: Any, inputs: tuple) -> list[np.ndarray]:
    """Run an exported model (path or session) on positional torch/numpy inputs; returns its outputs."""
    sess = session(path_or_session) if isinstance(path_or_session, (str, os.PathLike)) else path_or_session
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(inputs):
        raise ExportError(f"the ONNX model takes {len(names)} inputs ({names}) but {len(inputs)} were given")
    feed = {n: (t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t))
            for n, t in zip(names, inputs)}
    return sess.run(None, feed)


def parity(model: torch.nn.Module | None, qmodel: Any, onnx_path: str | os.PathLike, inputs: tuple | torch.Tensor,
           *, ort_session: Any = None, layers: bool = False) -> dict:
    """Outputs and pairwise relative errors of float (``model``, may be None), fake-quant, lowered torch (when
    ``qmodel`` ran a lower-* pass) and onnxruntime on ``inputs``.

    Returns ``{"rel_err": {"onnxruntime_vs_lowered": ..., ...}, "max_abs": {...}, "outputs": {stage: [arrays]},
    "table": markdown}``; pairs whose stages are missing are left out. With ``layers=True`` it adds
    `layerwise`'s result under ``"layers"`` (needs a file with activation Q/DQ).
    """
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    outs: dict[str, list[np.ndarray]] = {}
    sim = getattr(qmodel, "artifacts", {}).get("simulation")
    records = _record_fake_quants(_simulation_gm(qmodel), inputs) if layers else None
    with torch.no_grad():
        if model is not None:
            outs["float"] = _leaves(model(*inputs))
        if records is not None:
            outs["fake_quant"] = records[1]
        else:
            outs["fake_quant"] = _leaves(sim.gm(*inputs) if sim is not None else qmodel(*inputs))
        if sim is not None:
            outs["lowered"] = _leaves(qmodel(*inputs))
    outs["onnxruntime"] = [np.asarray(o, np.float32) for o in run_onnx(ort_session or onnx_path, inputs)]
    errs, max_abs = {}, {}
    for a, b in PAIRS:
        if a in outs and b in outs:
            errs[f"{a}_vs_{b}"] = rel_err(outs[a], outs[b])
            max_abs[f"{a}_vs_{b}"] = max(float(np.abs(x.astype(np.float64) - y).max()) if x.size else 0.0
                                         for x, y in zip(outs[a], outs[b]))
    rows = ["| compared | rel. error | max abs |", "|---|---|---|"]
    rows += [f"| {k.replace('_vs_', ' vs ')} | {v:.3e} | {max_abs[k]:.3e} |" for k, v in errs.items()]
    result = {"rel_err": errs, "max_abs": max_abs, "outputs": outs, "table": "\n".join(rows)}
    if layers:
        result["layers"] = layerwise(qmodel, onnx_path, inputs, _records=records)
    return result


# ------------------------------------------------------------------------------------------ layer by layer
def _simulation_gm(qmodel: Any):
    sim = getattr(qmodel, "artifacts", {}).get("simulation")
    graph = sim if sim is not None else getattr(qmodel, "graph", None)
    if graph is None or not hasattr(graph, "gm"):
        raise ExportError("layerwise parity needs a qgraph.QuantizedModel")
    return graph.gm


def _record_fake_quants(gm: torch.fx.GraphModule, inputs: tuple) -> tuple[dict, list[np.ndarray]]:
    """``{fx node name: (input, output, scale)}`` of every fake-quant node, and the graph outputs."""
    from qgraph.export.markers import FAKE_QUANT_TARGETS

    seen: dict[str, tuple] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_function" and n.target in FAKE_QUANT_TARGETS:
                x = self.env[n.args[0]] if isinstance(n.args[0], torch.fx.Node) else n.args[0]
                seen[n.name] = (x.detach().cpu().numpy(), out.detach().cpu().numpy(), float(n.args[1]),
                                *(int(a) for a in n.args[2:5]))
            return out

    with torch.no_grad():
        outs = Recorder(gm).run(*inputs)
    return seen, _leaves(outs)


def layerwise(qmodel: Any, onnx_path: str | os.PathLike, inputs: tuple | torch.Tensor, *, _records=None) -> dict:
    """Teacher-forced, layer-by-layer parity of activation quantization.

    The fake-quant simulation is discontinuous: a float difference at the last bit (another convolution
    algorithm, another thread count) moves a value across a rounding boundary, and the one-step change cascades
    through later layers. So each activation Q/DQ of the ONNX model is fed the *simulation's* input of that
    fake-quant (a new graph input) and its output compared with the simulation's: every layer is then checked on
    its own, and the model output is computed from the simulation's last quantized activations.

    A 7-bit activation is written without a Clip (see `qgraph.export.rewrite`), so an input beyond its calibrated
    range saturates at the 8-bit storage's range in onnxruntime and at the 7-bit one in the simulation: the
    forced inputs are clipped to the code range first (the codes the simulation computes are unchanged by
    that), and ``frac_beyond_range`` says how many lay outside it.

    Returns ``{"layers": [{"node", "elements", "max_steps", "frac_changed", "frac_beyond_range"}],
    "first_divergent": node | None (first layer off by more than one step), "output_rel_err": float}``.
    """
    import tempfile

    import onnx_ir as ir

    from qgraph.export.rewrite import FQ_INPUT_KEY, FQ_OUTPUT_KEY

    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    recorded, sim_out = _records or _record_fake_quants(_simulation_gm(qmodel), inputs)
    model = ir.load(str(onnx_path))
    graph = model.graph
    n_inputs = len(graph.inputs)
    forced, watched = [], []
    for node in list(graph):
        name = node.metadata_props.get(FQ_INPUT_KEY)
        if name in recorded:
            old = node.inputs[0]
            new = ir.Value(name=f"qgraph.forced.{name}", type=old.type, shape=old.shape)
            graph.inputs.append(new)
            node.replace_input_with(0, new)
            forced.append(name)
        name = node.metadata_props.get(FQ_OUTPUT_KEY)
        if name in recorded:
            graph.outputs.append(node.outputs[0])
            watched.append(name)
    if not forced:
        raise ExportError(f"{onnx_path} has no activation Q/DQ written by qgraph; layerwise parity applies to QDQ "
                          f"exports of models with fake-quantized activations")
    n_out = len(graph.outputs) - len(watched)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "forced.onnx")
        big = sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None) > 2**30
        ir.save(model, path, external_data="forced.onnx.data" if big else None)
        # onnxruntime 1.2x fails to initialize some teacher-forced graphs in its int8→uint8 conversion
        # ("Attempt to replace the existing tensor"); that transform only re-encodes codes, exactly.
        sess = session(path, disabled_optimizers=("QDQS8ToU8Transformer",))
        names = [i.name for i in sess.get_inputs()]
        feed = {n: (t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t))
                for n, t in zip(names[:n_inputs], inputs)}
        feed.update({f"qgraph.forced.{n}": _clip_to_codes(*recorded[n][:1], *recorded[n][2:]) for n in forced})
        results = sess.run(None, feed)
    rows = []
    for name, got in zip(watched, results[n_out:]):
        x, want, scale, zp, qmin, qmax = recorded[name]
        inside = _clip_to_codes(x, scale, zp, qmin, qmax) == x
        steps = np.abs(got.astype(np.float64) - want) / scale
        rows.append({"node": name, "elements": int(steps.size), "max_steps": float(steps.max()) if steps.size else 0.0,
                     "frac_changed": float((steps > 0.5).mean()) if steps.size else 0.0,
                     "frac_beyond_range": float(1.0 - inside.mean()) if steps.size else 0.0})
    first = next((r["node"] for r in rows if r["max_steps"] > 1.5), None)
    out_err = rel_err([np.asarray(r, np.float32) for r in results[:n_out]], sim_out)
    return {"layers": rows, "first_divergent": first, "output_rel_err": out_err}


def _clip_to_codes(x: np.ndarray, scale: float, zp: int, qmin: int, qmax: int) -> np.ndarray:
    """``x`` clipped to the float range of codes ``[qmin, qmax]`` (fake quantization's codes do not change)."""
    return np.clip(x, np.float32((qmin - zp) * scale), np.float32((qmax - zp) * scale)).astype(x.dtype)
