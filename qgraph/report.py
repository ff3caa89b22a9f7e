"""The user-facing report of a quantization run: Markdown + HTML with matplotlib PNGs.

Sections: summary (bytes, pipeline, target), per-layer weight error (plot), size breakdown by op
(plot), predicted vs measured latency per node (plot + Spearman rank correlation), lowering
report, verify summary, and the Pareto front when a search produced one.
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


def write_report(qmodel: Any, out_dir: str | Path, *, title: str = "qgraph report", measure: bool = True,
                 pareto_png: str | None = None) -> Path:
    """Write ``report.md``, ``report.html``, ``report.json`` and PNGs into ``out_dir``; return the .md path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = qmodel.report
    layers = rep.get("layers", [])
    md = [f"# {title}", "", f"- target: `{qmodel.target.name}`", f"- pipeline: `{qmodel.pipeline}`"]
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
