"""Normalising and checking the user's input batches against the traced example inputs."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from qgraph.errors import CalibrationError


def input_names(graph: Any) -> list[str]:
    return [getattr(n, "name", None) or str(i) for i, n in enumerate(graph.input_nodes())]


def as_tuple(batch: Any, names: list[str]) -> tuple:
    """A batch as a positional tuple: tensors, tuples/lists, or dicts keyed by input name."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, dict):
        missing = [n for n in names if n not in batch]
        if missing:
            raise CalibrationError(f"calibration batch has no entry for model input {missing[0]!r}; "
                                   f"the model's inputs are {names}")
        return tuple(batch[n] for n in names)
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    raise CalibrationError(f"a calibration batch is a tensor, a tuple of tensors or a dict by input name; "
                           f"got {type(batch).__name__}")


def check_batch(batch: tuple, example: tuple, names: list[str], dynamic: list[set[int]] | None = None) -> None:
    """Raise `CalibrationError` naming the input whose count, rank, shape or dtype does not fit."""
    if len(batch) != len(example):
        raise CalibrationError(f"calibration batch has {len(batch)} inputs but the model takes {len(example)} "
                               f"({', '.join(names)})")
    for i, (got, want) in enumerate(zip(batch, example)):
        name = names[i] if i < len(names) else f"#{i}"
        if not isinstance(want, torch.Tensor):
            continue
        if not isinstance(got, torch.Tensor):
            raise CalibrationError(f"calibration input {name!r} should be a tensor, got {type(got).__name__}")
        if got.dim() != want.dim():
            raise CalibrationError(f"calibration input {name!r} has {got.dim()} dims {list(got.shape)}; the model "
                                   f"was traced with {list(want.shape)}")
        free = dynamic[i] if dynamic is not None and i < len(dynamic) else {0}
        if any(got.shape[d] != want.shape[d] for d in range(want.dim()) if d not in free):
            which = ", ".join(map(str, sorted(free))) or "none"
            raise CalibrationError(f"calibration input {name!r} has shape {list(got.shape)} but the model was "
                                   f"traced with {list(want.shape)} (dims that may differ: {which})")
        if got.dtype != want.dtype and not (got.is_floating_point() and want.is_floating_point()):
            raise CalibrationError(f"calibration input {name!r} has dtype {got.dtype}, the model expects {want.dtype}")


def batches(data: Iterable[Any] | None, graph: Any, limit: int | None = None) -> Iterator[tuple]:
    """Checked positional batches from ``data``."""
    names = input_names(graph)
    example = tuple(getattr(graph, "example_inputs", ()))
    dynamic = graph.dynamic_dims() if hasattr(graph, "dynamic_dims") else None
    for i, item in enumerate(data or ()):
        if limit is not None and i >= limit:
            return
        batch = as_tuple(item, names)
        if example:
            check_batch(batch, example, names, dynamic)
        yield batch
