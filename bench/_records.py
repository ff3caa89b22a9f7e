"""Shared helpers of the bench scripts: JSON records (DESIGN.md §7) and Markdown tables."""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any


class Records:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, case: str, metric: str, value: float, **extra: Any) -> None:
        self.items.append({"case": case, "metric": metric, "value": float(value), **extra})

    def write(self, path: str | None) -> None:
        if path:
            Path(path).write_text(json.dumps(self.items, indent=1))


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    for r in rows:
        out.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(out)


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {platform.system()}"
