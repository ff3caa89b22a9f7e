"""What a search reports beyond its trials: the bytes a whole artifact stores, and a held-out front report
(accuracy against stored bytes, uniform baselines marked, each front point linked to its strategy JSON)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from qgraph.search.space import Space


def stored_bytes_rest(graph: Any, space: Space) -> int:
    """Bytes of every stored tensor the space does not choose for (norms, biases, buffers), each tensor once;
    a strategy's whole stored size is ``space.weight_bytes(a) + stored_bytes_rest(graph, space)``."""
    chosen = {id(graph.param(graph.find(layer.node), "weight")) for layer in space.layers}
    seen: set[int] = set()
    total = 0
    for t in list(graph.gm.parameters()) + list(graph.gm.buffers()):
        if id(t) in seen or id(t) in chosen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def write_front_report(points: list[dict[str, Any]], out_dir: str | Path, *, title: str, metric: str,
                       x_label: str = "stored MB", x_key: str = "bytes", x_scale: float = 1e-6,
                       x_limit: float | None = None, x_reference: float | None = None) -> Path:
    """report.md + pareto.png (+ one strategy JSON per point) in ``out_dir``. ``points``: dicts with ``name``,
    ``kind`` (``baseline`` or ``front``), ``metric``, ``x_key`` and ``strategy``. ``x_limit`` / ``x_reference``
    (in ``x_key`` units): a constraint and the float model's value, drawn as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    (out / "strategies").mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", f"![{metric} vs {x_label}](pareto.png)", "",
             f"| point | kind | {metric} | {x_label} | strategy |", "|---|---|---:|---:|---|"]
    for k, p in enumerate(points):
        fname = f"strategies/{k:02d}-{''.join(c if c.isalnum() else '-' for c in p['name'])}.json"
        p["strategy"].save(out / fname)
        lines.append(f"| {p['name']} | {p['kind']} | {p['metric']:.4f} | {p[x_key] * x_scale:.3f} | "
                     f"[{Path(fname).name}]({fname}) |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    front = sorted((p for p in points if p["kind"] == "front"), key=lambda p: p[x_key])
    ax.plot([p[x_key] * x_scale for p in front], [p["metric"] for p in front], "o-", color="#c62828", ms=4,
            label="searched front (held-out)")
    for p in points:
        if p["kind"] == "baseline":
            ax.scatter([p[x_key] * x_scale], [p["metric"]], marker="s", s=30, color="#1565c0", zorder=3)
            ax.annotate(p["name"], (p[x_key] * x_scale, p["metric"]), fontsize=7, xytext=(4, -10),
                        textcoords="offset points")
    if x_limit is not None:
        ax.axvline(x_limit * x_scale, color="#2e7d32", ls="--", lw=1, label="limit")
    if x_reference is not None:
        ax.axvline(x_reference * x_scale, color="#757575", ls=":", lw=1, label="float model")
    ax.set_xlabel(x_label)
    ax.set_ylabel(metric)
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)
    return out / "report.md"
