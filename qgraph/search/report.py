"""The search report: Markdown + HTML, a Pareto plot (metric vs bytes, front highlighted), a per-layer bit
allocation chart, the chosen strategy (JSON and TOML strategy files) and every trial as JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from qgraph.search.objectives import Trial, effective_bits
from qgraph.search.space import Space

_SCHEME_COLORS = {"fp32": "#9e9e9e", "w8": "#2e7d32", "w4": "#1565c0", "bcq": "#ef6c00"}


def _color(label: str) -> str:
    for prefix, color in _SCHEME_COLORS.items():
        if label.startswith(prefix):
            return color
    return "#6a1b9a"


def pareto_plot(result: Any, path: Path) -> None:
    """Metric vs weight MB over all trials; the front as a line, baselines and the chosen point marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    trials = result.trials
    ax.scatter([t.analytic.bytes / 1e6 for t in trials], [t.metric for t in trials], s=14, c="#b0b0b0",
               label=f"trials ({len(trials)})", zorder=1)
    front = result.front
    ax.plot([t.analytic.bytes / 1e6 for t in front], [t.metric for t in front], "o-", color="#c62828", ms=4,
            lw=1.2, label="Pareto front", zorder=2)
    for label, t in result.baselines.items():
        ax.scatter([t.analytic.bytes / 1e6], [t.metric], marker="s", s=30, color=_color(label), zorder=3)
        ax.annotate(f"uniform {label}", (t.analytic.bytes / 1e6, t.metric), fontsize=7, xytext=(4, -10),
                    textcoords="offset points")
    if result.chosen is not None:
        c = result.chosen
        ax.scatter([c.analytic.bytes / 1e6], [c.metric], marker="*", s=160, color="#fdd835", edgecolor="k",
                   zorder=4, label="chosen")
    if result.constraints.max_bytes is not None:
        ax.axvline(result.constraints.max_bytes / 1e6, color="k", ls="--", lw=0.8, label="max bytes")
    ax.set_xlabel("quantized weight MB")
    ax.set_ylabel(result.metric_name + (" (higher is better)" if result.metric_name == "cosine" else " (lower is better)"))
    ax.set_title(f"{result.options.model} on {result.options.target}: {result.options.driver} search")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bits_chart(space: Space, trial: Trial, path: Path) -> None:
    """Bits per searched layer of a strategy, coloured by scheme (hatched: int8 activations too)."""
    idx = space.searchable
    labels = [space.layers[i].choices[trial.assignment[i]].label for i in idx]
    bits = [space.layers[i].choices[trial.assignment[i]].bits for i in idx]
    names = [_short(space.layers[i].key) for i in idx]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.2 * len(idx) + 2), 4))
    bars = ax.bar(range(len(idx)), [min(b, 16) for b in bits], color=[_color(lb) for lb in labels])
    for bar, lb in zip(bars, labels):
        if "+a" in lb:
            bar.set_hatch("//")
    ax.set_xticks(range(len(idx)), names, rotation=90, fontsize=6)
    ax.set_ylabel("weight bits (fp32 drawn at 16)")
    ax.set_title(f"bit allocation ({space.avg_bits(trial.assignment):.2f} avg bits)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _SCHEME_COLORS.values()]
    ax.legend(handles, ["fp32", "int8", "int4", "bcq"], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(key: str) -> str:
    return key.replace("encoder.encoder.layer.", "L").replace("model.layers.", "L").replace("attention.", "attn.")


def _row(name: str, t: Trial, space: Space, metric: str) -> str:
    ms = f"{t.measured_latency_us:.0f}" if t.measured_latency_us is not None else "–"
    return (f"| {name} | {t.metric:.4f} | {t.drop:+.4f} | {t.analytic.bytes / 1e6:.3f} | {t.analytic.avg_bits:.2f} | "
            f"{effective_bits(space, t.assignment):.2f} | {t.analytic.latency_us:.0f} | {ms} | "
            f"{'yes' if t.feasible else 'no'} |")


def write_search_report(result: Any, out_dir: str | Path) -> Path:
    """Write report.md / report.html / pareto.png / bits.png / strategy.json / strategy.toml / trials.json
    into ``out_dir``; return the Markdown path."""
    from qgraph.report import _to_html

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    space = result.space
    s = result.summary()
    pareto_plot(result, out / "pareto.png")
    md = [f"# qgraph search: {result.options.model} for {result.options.target}", "",
          (f"- driver: `{result.options.driver}`, seed {result.options.seed}, {s['trials']} trials "
           f"({s['evaluated']} evaluated, {s['cached']} from the cache), {s['seconds']:.1f} s"),
          "- timings (s): " + ", ".join(f"{k} {v}" for k, v in s["timings"].items()),
          f"- constraints: {result.constraints.describe()}",
          f"- metric: {result.metric_name} (float model: {result.base_metric:.4f})",
          f"- sensitivity: {result.sens.method}" + (f", {result.sens.iterations} Hutchinson iterations"
                                                    f"{' (converged)' if result.sens.converged else ''}"
                                                    if result.sens.method.startswith("hessian") else ""),
          *([("- anchors (measured before the search, outside the trial budget): "
              + ", ".join(f"{k}: {v:.4f}" for k, v in result.anchors.items())),
             "- Ω scale per label: " + ", ".join(f"{k} ×{v:.3g}" for k, v in result.anchor_scales.items())]
            if result.anchors else []),
          (f"- space: {len(space.searchable)} searched nodes, choices {', '.join(space.labels())}; "
           f"{len(space.ties)} tie groups"), "",
          "## Chosen vs uniform", "",
          "| strategy | metric | drop | MB | avg bits | stored bits | predicted µs | measured µs | feasible |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    if result.chosen is not None:
        md.append(_row("**searched**", result.chosen, space, result.metric_name))
    for label, t in result.baselines.items():
        md.append(_row(f"uniform {label}", t, space, result.metric_name))
    md += ["", "## Pareto front", "", "![pareto](pareto.png)", "",
           "| metric | MB | avg bits | predicted µs | choices |", "|---:|---:|---:|---:|---|"]
    for t in result.front:
        counts = ", ".join(f"{k}×{v}" for k, v in _counts(space, t).items())
        md.append(f"| {t.metric:.4f} | {t.analytic.bytes / 1e6:.3f} | {t.analytic.avg_bits:.2f} | "
                  f"{t.analytic.latency_us:.0f} | {counts} |")
    if result.chosen is not None:
        c = result.chosen
        bits_chart(space, c, out / "bits.png")
        c.strategy.save(out / "strategy.json")
        c.strategy.save(out / "strategy.toml")
        md += ["", "## Chosen strategy", "", "![bit allocation](bits.png)", "",
               (f"Pipeline: `{c.strategy.pipeline()}` with `strategy.toml` / `strategy.json` "
                f"(sha256 `{c.strategy.sha256[:16]}`)."), "",
               "| node | op | choice | bits | bytes | Ω | tr(H)/n |", "|---|---|---|---:|---:|---:|---:|"]
        for i, layer in enumerate(space.layers):
            k = c.assignment[i]
            tr = result.sens.traces.get(layer.key)
            md.append(f"| {layer.key} | {layer.op} | {layer.choices[k].label} | {layer.choices[k].bits} | "
                      f"{layer.bytes_of(k):,} | {result.sens.omega[i][k]:.3g} | "
                      f"{'' if tr is None else f'{tr:.3g}'} |")
    else:
        md += ["", "No trial met every constraint."]
    text = "\n".join(md) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(_to_html(text, f"qgraph search: {result.options.model}"))
    trials = [{"metric": t.metric, "drop": t.drop, "bytes": t.analytic.bytes, "avg_bits": t.analytic.avg_bits,
               "latency_us": t.analytic.latency_us, "feasible": t.feasible, "strategy": t.strategy.to_dict()}
              for t in result.trials]
    (out / "trials.json").write_text(json.dumps({"summary": s, "trials": trials}, indent=1))
    return out / "report.md"


def _counts(space: Space, t: Trial) -> dict[str, int]:
    from qgraph.search.objectives import summarize

    return summarize(space, t.assignment)
