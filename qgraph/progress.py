"""Progress bars for long work (calibration, optimizers, search); silenced with ``progress=False``."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True,
             unit: str = "it") -> Iterable[T]:
    """Wrap ``items`` in a tqdm bar on stderr unless disabled (or ``QGRAPH_QUIET=1``)."""
    if not enabled or os.environ.get("QGRAPH_QUIET") == "1":
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
