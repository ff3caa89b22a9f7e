"""Quantized weights on disk (safetensors, validated on read, written atomically): the search's shared
folder and the persistent cache of GPTQ / aespa results."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def optimized_dir() -> Path:
    """Where GPTQ / aespa results persist across runs (``QGRAPH_OPTIMIZED_CACHE``, default
    ``~/.cache/qgraph/search/optimized``): keyed by content, so a stale file is never read."""
    return Path(os.environ.get("QGRAPH_OPTIMIZED_CACHE", "~/.cache/qgraph/search/optimized")).expanduser()


def load_qweight_file(path: Path) -> Any:
    """A cached quantized weight (safetensors, validated), or None when absent, torn or tampered."""
    from qgraph.errors import SpecError
    from qgraph.quant.qweight_io import load_qweight

    if not path.is_file():
        return None
    try:
        return load_qweight(path)
    except SpecError:
        return None  # torn by a kill or tampered with: quantize again


def save_qweight_file(path: Path, q: Any) -> None:
    """Atomic write (temporary file, then rename), so a reader sees a whole file or none. No pickle."""
    from qgraph.quant.qweight_io import save_qweight

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        save_qweight(tmp, q)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache only: a full or read-only disk costs time, not results
