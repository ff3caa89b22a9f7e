"""argparse value types that range-check options when the command line is parsed (one line, exit 2)."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable

MAX_GROUP_SIZE = 1 << 16


def int_range(lo: int, hi: int | None = None, what: str = "") -> Callable[[str], int]:
    """An integer in ``[lo, hi]`` (``hi=None``: no upper bound)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"{what or 'value'} must be {bound}, got {v}")
        return v

    return parse


def finite_float(lo: float = 0.0, *, inclusive: bool = False, what: str = "") -> Callable[[str], float]:
    """A finite float above ``lo`` (or at least ``lo`` with ``inclusive``)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v) or v < lo or (v == lo and not inclusive):
            raise argparse.ArgumentTypeError(f"{what or 'value'} must be a finite number "
                                             f"{'≥' if inclusive else '>'} {lo:g}, got {text}")
        return v

    return parse


group_size = int_range(1, MAX_GROUP_SIZE, "group size")


def group_size_list(text: str) -> tuple[int, ...]:
    """Comma-separated group sizes, each in 1..65536."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("give at least one group size")
    return tuple(group_size(p) for p in parts)
