"""The user-facing report of a quantization run: Markdown + HTML with matplotlib PNGs.

It leads with the answer a user came for (`end_to_end`): end-to-end latency at the user's batch (the
example inputs), stored bytes and output quality, each against the float model and against onnxruntime
fp32 on this host (the float model exported with the dynamo exporter; that column is skipped with a note
when onnxruntime is missing or the export fails). Then: summary (pipeline, target), per-layer weight error
(plot), size breakdown by op (plot), predicted vs measured latency per node (plot + Spearman rank
correlation), lowering report, verify summary, and the Pareto front when a search produced one.
``measure=False`` skips every timing (and the onnxruntime export, which only the comparison needs).
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _bar_layers(layers: list[dict], path: Path) -> None:
    names = [r["node"] for r in layers]
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(names) + 2), 4))
    ax.bar(range(len(names)), [r["rel_weight_err"] for r in layers], color="#4472c4")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("‖Ŵ − W‖ / ‖W‖")
    ax.set_title("Per-layer relative weight error")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bar_sizes(by_op: dict[str, tuple[int, int]], path: Path) -> None:
    ops = sorted(by_op)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(ops))
    ax.bar([i - 0.2 for i in x], [by_op[o][0] / 1e6 for o in ops], width=0.4, label="fp32")
    ax.bar([i + 0.2 for i in x], [by_op[o][1] / 1e6 for o in ops], width=0.4, label="quantized")
    ax.set_xticks(list(x), ops)
    ax.set_ylabel("MB")
    ax.set_title("Weight bytes by op")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scatter_latency(rows: list[tuple[str, float, float]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    pred = [r[1] for r in rows]
    meas = [r[2] for r in rows]
    ax.loglog(pred, meas, "o", alpha=0.6)
    lo, hi = min(pred + meas), max(pred + meas)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("predicted µs (cost model)")
    ax.set_ylabel("measured µs (host)")
    ax.set_title("Per-node latency: predicted vs measured")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def latency_rows(qmodel: Any, inputs: tuple | None = None) -> list[tuple[str, float, float]]:
    """(node, predicted µs, measured µs) for nodes present in both the simulation and the lowered graph."""
    from qgraph.analyses import estimate_cost, measure_node_latency
    from qgraph.lowering import LOWERED_FROM_KEY

    sim = qmodel.artifacts.get("simulation", qmodel.graph)
    predicted = estimate_cost(sim, qmodel.target).by_name()
    measured_raw = measure_node_latency(qmodel.graph, inputs, repeats=5, warmup=1)
    names = {n.name: n.meta.get(LOWERED_FROM_KEY, n.name) for n in qmodel.graph.gm.graph.nodes}
    measured = {names.get(k, k): v for k, v in measured_raw.items()}
    return [(k, predicted[k].latency_us, measured[k]) for k in predicted
            if k in measured and predicted[k].latency_us > 0 and measured[k] > 0]


# --- the answer first: end-to-end latency, bytes and quality against float and onnxruntime fp32 ----------
def stored_bytes(module: Any) -> int:
    """Bytes of every tensor ``module`` holds (parameters and buffers; a tensor shared by several counts once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _first_tensor(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def compare_outputs(ref: Any, out: Any, *, logits: bool = False) -> dict[str, float]:
    """Quality of ``out`` against ``ref`` (first tensor of each): mean cosine over rows (the last dimension),
    max relative error, and, for ``logits``, top-1 agreement over the last dimension."""
    import torch

    r, o = _first_tensor(ref), _first_tensor(out)
    if r is None or o is None or r.shape != o.shape:
        return {}
    r, o = r.detach().double(), o.detach().double()
    rows_r = r.reshape(-1, r.shape[-1]) if r.dim() >= 1 else r.reshape(1, 1)
    rows_o = o.reshape(-1, o.shape[-1]) if o.dim() >= 1 else o.reshape(1, 1)
    res = {"cosine": float(torch.nn.functional.cosine_similarity(rows_o, rows_r, dim=-1).mean()),
           "rel_err": float((o - r).abs().max() / r.abs().max().clamp_min(1e-30))}
    if logits and r.dim() >= 2 and r.shape[-1] > 1:
        res["agreement"] = float((rows_o.argmax(-1) == rows_r.argmax(-1)).double().mean())
    return res


class OrtFp32:
    """The float model exported with the dynamo exporter at the example inputs' shapes, in an onnxruntime
    session (graph optimizations on, as many intra-op threads as torch uses, no spin-waiting: its spinning
    workers, timed in turns with torch in one process, slowed the torch call after them up to 10x on a loaded
    2-core host, and onnxruntime itself ran faster without them there)."""

    def __init__(self, path: Path, n_inputs: int):
        import onnxruntime as ort
        import torch

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        if len(self.names) != n_inputs:
            raise ValueError(f"the exported model takes {len(self.names)} inputs, the model {n_inputs}")
        self.bytes = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())

    def __call__(self, *args: Any) -> Any:
        import torch

        feed = {n: a.detach().cpu().numpy() for n, a in zip(self.names, args, strict=True)}
        return torch.from_numpy(self.session.run(None, feed)[0])


def export_ort_fp32(model: Any, inputs: tuple, folder: Path) -> OrtFp32:
    """`OrtFp32` of ``model`` (exported quietly into ``folder``); raises whatever export or loading raises."""
    import contextlib
    import io
    import logging
    import warnings

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "float.onnx"
    sink = io.StringIO()
    level = logging.getLogger("torch").level
    logging.getLogger("torch").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), \
                torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, tuple(inputs), str(path), dynamo=True, external_data=False, verbose=False)
    finally:
        logging.getLogger("torch").setLevel(level)
    return OrtFp32(path, len(inputs))


def _load() -> str:
    import os

    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def end_to_end(qmodel: Any, float_model: Any, inputs: tuple | None, *, measure: bool = True, logits: bool = False,
               scratch: Path | None = None, budget_s: float = 20.0, rounds: int = 20,
               extra: dict[str, tuple[Any, int | None]] | None = None) -> dict[str, Any]:
    """The headline numbers: latency at the batch of ``inputs`` (default: the graph's example inputs), stored
    bytes and quality of ``qmodel`` against ``float_model`` (torch eager) and onnxruntime fp32. Latencies
    are medians of interleaved rounds; quality is measured on ``inputs`` too. ``extra``: more deployments of
    the same quantized model, ``{row name: (callable, stored bytes)}`` (e.g. its onnxruntime session), timed and
    scored in the same rounds."""
    import os
    import tempfile

    import torch

    from qgraph.execution import first_line, interleaved_seconds, medians_ms

    inputs = tuple(inputs if inputs is not None else getattr(qmodel.graph, "example_inputs", ()) or ())
    res: dict[str, Any] = {"batch": None, "inputs": [list(t.shape) for t in inputs if hasattr(t, "shape")],
                           "threads": torch.get_num_threads(), "notes": [], "rows": {}}
    if inputs and hasattr(inputs[0], "shape") and len(inputs[0].shape):
        res["batch"] = int(inputs[0].shape[0])
    rows = res["rows"]
    gm = getattr(qmodel, "gm", None)
    rows["qgraph"] = {"bytes": stored_bytes(gm) if gm is not None else None}
    if float_model is not None:
        rows["float"] = {"bytes": stored_bytes(float_model)}
    if not inputs:
        res["notes"].append("no example inputs: nothing measured")
        return res
    with torch.no_grad():
        ref = float_model(*inputs) if float_model is not None else None
        got = qmodel(*inputs)
    if ref is not None:
        rows["qgraph"]["quality"] = compare_outputs(ref, got, logits=logits)
    extra = dict(extra or {})
    for name, (fn, nbytes) in extra.items():
        rows[name] = {"bytes": nbytes, "extra": True}
        if ref is not None:
            with torch.no_grad():
                rows[name]["quality"] = compare_outputs(ref, fn(*inputs), logits=logits)
    ort_call = None
    if not measure:
        res["notes"].append("latency not measured and onnxruntime fp32 not run (timing is off)")
    elif float_model is None:
        res["notes"].append("no float torch model: the float and onnxruntime fp32 columns are skipped")
    else:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            res["notes"].append("onnxruntime is not installed: its column is skipped")
        else:
            tmp = Path(tempfile.mkdtemp(prefix="qgraph-ort-", dir=scratch))
            try:
                ort_call = export_ort_fp32(float_model, inputs, tmp)
                rows["onnxruntime fp32"] = {"bytes": ort_call.bytes}
                ort_out = ort_call(*inputs)
                rows["onnxruntime fp32"]["quality"] = compare_outputs(ref, ort_out, logits=logits)
                rows["qgraph"]["quality_vs_ort"] = compare_outputs(ort_out, got, logits=logits)
            except Exception as e:  # noqa: BLE001 - any export / session failure: skip the column, say why
                ort_call = None
                rows.pop("onnxruntime fp32", None)
                res["notes"].append(f"onnxruntime fp32 skipped: exporting the float model failed ({first_line(e)})")
            finally:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
    if measure:
        fns: dict[str, Any] = {}
        if float_model is not None:
            fns["float"] = float_model
        if ort_call is not None:
            fns["onnxruntime fp32"] = ort_call
        if qmodel.compiled:
            fns["qgraph eager"] = qmodel.eager
            rows["qgraph eager"] = {"bytes": rows["qgraph"]["bytes"]}
        fns["qgraph"] = qmodel
        fns.update({name: fn for name, (fn, _) in extra.items()})
        med = medians_ms(interleaved_seconds(fns, inputs, rounds=rounds, warmup=2, budget_s=budget_s))
        for k, v in med.items():
            rows[k]["ms"] = v
        res["rounds"] = rounds
        res["load_average"] = _load()
        res["cpus"] = os.cpu_count()
        res["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "default")
        q_ms = med["qgraph"]
        res["speedup_vs_float"] = med["float"] / q_ms if "float" in med else None
        res["speedup_vs_ort_fp32"] = med["onnxruntime fp32"] / q_ms if "onnxruntime fp32" in med else None
    res["execution"] = "compiled" if qmodel.compiled else "eager"
    return res


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _fmt_x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _fmt_quality(qd: dict | None) -> str:
    if not qd:
        return "—"
    parts = [f"cosine {qd['cosine']:.4f}"]
    if "agreement" in qd:
        parts.append(f"top-1 {qd['agreement']:.3f}")
    parts.append(f"rel. err {qd['rel_err']:.2g}")
    return ", ".join(parts)


def headline_markdown(e2e: dict[str, Any]) -> list[str]:
    """The report's first section: one sentence with the answer, then the table behind it."""
    rows, b = e2e["rows"], e2e.get("batch")
    q = rows["qgraph"]
    where = f"batch {b} (the example inputs)" if b is not None else "the example inputs"
    f_bytes = rows.get("float", {}).get("bytes")
    parts = []
    if "ms" in q:
        lat = f"{q['ms']:.2f} ms per call at {where}, {e2e['execution']}"
        if e2e.get("speedup_vs_float") is not None:
            lat += f": {_speed_words(e2e['speedup_vs_float'])} the float model"
        if e2e.get("speedup_vs_ort_fp32") is not None:
            lat += f", {_speed_words(e2e['speedup_vs_ort_fp32'])} onnxruntime fp32"
        parts.append(lat)
    if q.get("bytes") is not None:
        size = f"{fmt_bytes(q['bytes'])} stored"
        if f_bytes:
            size += f" ({100 * q['bytes'] / f_bytes:.1f}% of float's {fmt_bytes(f_bytes)})"
        parts.append(size)
    if q.get("quality"):
        qd = q["quality"]
        parts.append(f"mean cosine to float {qd['cosine']:.4f}" + (f", top-1 agreement {qd['agreement']:.3f}"
                                                                     if "agreement" in qd else ""))
    md = ["## The answer", "", "**" + "; ".join(parts) + ".**" if parts else "Nothing measured.", ""]
    md += [f"| model | latency ms (batch {b}) | speed vs float | speed vs onnxruntime fp32 | stored | "
           "bytes vs float | quality vs float |", "|---|---:|---:|---:|---:|---:|---|"]
    ort_ms = rows.get("onnxruntime fp32", {}).get("ms")
    float_ms = rows.get("float", {}).get("ms")
    names = {"float": "float (torch eager)", "onnxruntime fp32": "onnxruntime fp32",
             "qgraph eager": "qgraph, eager", "qgraph": f"**qgraph, {e2e['execution']}**"}
    for key in ("float", "onnxruntime fp32", "qgraph eager", "qgraph", *(k for k, r in rows.items() if r.get("extra"))):
        if key not in rows:
            continue
        r = rows[key]
        ms = r.get("ms")
        by = r.get("bytes")
        md.append(f"| {names.get(key, key)} | {'—' if ms is None else f'{ms:.2f}'} | "
                  f"{_fmt_x(float_ms / ms if ms and float_ms else None)} | {_fmt_x(ort_ms / ms if ms and ort_ms else None)} | "
                  f"{fmt_bytes(by)} | "
                  f"{'—' if not (by and f_bytes) else f'{100 * by / f_bytes:.1f}%'} | "
                  f"{'reference' if key == 'float' else _fmt_quality(r.get('quality'))} |")
    md.append("")
    if q.get("quality_vs_ort"):
        md.append(f"- quality against onnxruntime fp32's output: {_fmt_quality(q['quality_vs_ort'])}")
    comp = e2e.get("compile")
    if comp:
        md.append(f"- execution: {_compile_words(comp)}")
    if "ms" in q:
        md.append(f"- latency: median of up to {e2e['rounds']} interleaved rounds on this host, {e2e['threads']} "
                  f"threads ({e2e['cpus']} CPUs, 1-min load average {e2e['load_average']}, OMP_WAIT_POLICY="
                  f"{e2e['omp_wait_policy']}, onnxruntime without spin-waiting); speed columns are ratios of "
                  f"latencies (> 1× is faster). On a loaded machine, OMP_WAIT_POLICY=PASSIVE often speeds torch up "
                  f"several times (bench/e2e.py)")
    md += [f"- {n}" for n in e2e.get("notes", [])]
    md.append("- stored: every tensor the runnable model holds (codes, scales, biases, float layers); "
              "onnxruntime: its file")
    return md + [""]


def _speed_words(x: float) -> str:
    return f"{x:.2f}× faster than" if x >= 1 else f"{1 / x:.2f}× slower than"


def _compile_words(c: dict) -> str:
    req, used = c.get("requested"), c.get("used")
    if req == "off":
        return "eager (compile off)"
    s = f"compile {req}: running {used}"
    if c.get("seconds") is not None:
        s += f"; torch.compile ({c.get('backend', 'inductor')}) took {c['seconds']:.1f} s"
    if c.get("eager_ms") is not None and c.get("compiled_ms") is not None:
        s += f"; on the example inputs eager {c['eager_ms']:.2f} ms, compiled {c['compiled_ms']:.2f} ms"
    if c.get("error"):
        s += f"; error: {c['error']}"
    if c.get("note"):
        s += f" ({c['note']})"
    return s


def write_report(qmodel: Any, out_dir: str | Path, *, title: str = "qgraph report", measure: bool = True,
                 pareto_png: str | None = None, float_model: Any = None, inputs: tuple | None = None,
                 logits: bool = False, extra: dict[str, tuple[Any, int | None]] | None = None) -> Path:
    """Write ``report.md``, ``report.html``, ``report.json`` and PNGs into ``out_dir``; return the .md path.

    With ``float_model`` (the model that was quantized) the report opens with `end_to_end` at the batch of
    ``inputs`` (default: the example inputs); ``logits``: the output is class logits (adds top-1 agreement);
    ``extra``: other deployments of the same model for that table (see `end_to_end`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = qmodel.report
    layers = rep.get("layers", [])
    md = [f"# {title}", ""]
    if float_model is not None or inputs is not None:
        e2e = end_to_end(qmodel, float_model, inputs, measure=measure, logits=logits, extra=extra)
        e2e["compile"] = rep.get("compile")
        rep["end_to_end"] = {k: v for k, v in e2e.items() if k != "compile"}
        md += headline_markdown(e2e)
    md += [f"- target: `{qmodel.target.name}`", f"- pipeline: `{qmodel.pipeline}`"]
    fp32 = sum(r["fp32_bytes"] for r in layers)
    qb = sum(r["bytes"] for r in layers)
    if fp32:
        md.append(f"- quantized weights: {qb / 1e6:.2f} MB vs {fp32 / 1e6:.2f} MB fp32 ({100 * qb / fp32:.1f}%)")
    images = []
    if layers:
        _bar_layers(layers, out / "layer_error.png")
        by_op: dict[str, tuple[int, int]] = {}
        for r in layers:
            a, b = by_op.get(r["op"], (0, 0))
            by_op[r["op"]] = (a + r["fp32_bytes"], b + r["bytes"])
        _bar_sizes(by_op, out / "size_breakdown.png")
        images += ["layer_error.png", "size_breakdown.png"]
        md += ["", "## Per-layer quantization error", "", "![per-layer error](layer_error.png)", "",
               "| layer | op | spec | rel. weight error | bytes | fp32 bytes |", "|---|---|---|---:|---:|---:|"]
        md += [f"| {r['node']} | {r['op']} | {r['spec']} | {r['rel_weight_err']:.4f} | {r['bytes']:,} | "
               f"{r['fp32_bytes']:,} |" for r in layers]
        md += ["", "## Size breakdown", "", "![size breakdown](size_breakdown.png)"]
    if measure and hasattr(qmodel.graph, "gm"):
        rows = latency_rows(qmodel)
        if rows:
            _scatter_latency(rows, out / "latency.png")
            images.append("latency.png")
            rho = spearman([r[1] for r in rows], [r[2] for r in rows])
            rep["latency_rank_correlation"] = rho
            md += ["", "## Predicted vs measured latency", "", f"Spearman rank correlation over {len(rows)} nodes: "
                   f"**{rho:.3f}** (predicted: `{qmodel.target.name}` cost model; measured: this host, node by node)",
                   "", "![latency](latency.png)"]
    if rep.get("lowering"):
        md += ["", "## Lowering", "", "| node | op | kernel | status | note |", "|---|---|---|---|---|"]
        md += [f"| {r['node']} | {r['op']} | {r['kernel']} | {r['status']} | {r['reason']} |" for r in rep["lowering"]]
    if rep.get("onnxruntime_layers"):
        md += onnxruntime_layers_markdown(rep["onnxruntime_layers"])
    if rep.get("verify"):
        v = rep["verify"]
        md += ["", "## Verify (lowered vs simulation)", "",
               f"- output relative error: {v['output_rel_err']:.3g} (tolerance {v['tol']:g})",
               f"- first divergent node: {v['first_divergent'] or 'none'}"]
    if pareto_png:
        md += ["", "## Pareto front", "", f"![pareto]({pareto_png})"]
    text = "\n".join(md) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(_to_html(text, title))
    (out / "report.json").write_text(json.dumps(_jsonable(rep), indent=1))
    return out / "report.md"


def onnxruntime_layers_markdown(choice: dict[str, Any]) -> list[str]:
    """The onnxruntime route's per-layer int8 / float kernel times and what was kept float."""
    md = ["", "## onnxruntime: int8 or float per layer (measured)", "",
          f"Each int8 layer's kernel against its float twin, in onnxruntime on this host. Layers slower in int8 by "
          f"more than {choice['margin']:g}x: {', '.join(choice['candidates']) or 'none'}."]
    if choice["candidates"]:
        kept = ", ".join(choice["kept_float"]) or "none (the all-int8 file was faster end to end)"
        md.append(f"Whole model with those layers float: {choice['with_float_ms']:.2f} ms, all int8: "
                  f"{choice['all_int8_ms']:.2f} ms; kept float: {kept}.")
    md += ["", "| layer | int8 kernel | µs | float kernel | µs | int8 / float |", "|---|---|---:|---|---:|---:|"]
    md += [f"| {r['layer']} | {r['int8_op']} | {r['int8_us']:.1f} | {r['float_op']} | {r['float_us']:.1f} | "
           f"{r['int8_us'] / r['float_us'] if r['float_us'] else float('inf'):.2f} |" for r in choice["layers"]]
    return md


def _to_html(markdown: str, title: str) -> str:
    """A small Markdown subset (headings, lists, tables, images) rendered to standalone HTML."""
    body, in_table = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= set("-:") for c in cells):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            src = line[line.index("(") + 1:-1]
            body.append(f'<p><img src="{html.escape(src)}" style="max-width:100%"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>\n")


def _inline(text: str) -> str:
    import re

    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return str(obj)
