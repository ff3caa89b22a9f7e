"""Quantized weights as data: a JSON-able entry plus named tensors, checked when read back.

Artifacts and the search's weight cache store quantized weights this way (safetensors, never pickle).
Reading validates what a tampered or torn file could get wrong: the kind, tensor dtypes and shapes, codes
inside the spec's range, finite positive scales. A bad part raises `SpecError` naming the field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qgraph.errors import SpecError
from qgraph.quant.bcq_weight import BCQWeight
from qgraph.quant.block_scaled import BlockScaledWeight
from qgraph.quant.multipoint import MultipointWeight
from qgraph.quant.qspec import QSpec
from qgraph.quant.qtensor import UniformWeight

KINDS = ("bcq", "block_scaled", "multipoint", "uniform")
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def qweight_parts(q: Any, prefix: str = "") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(entry, tensors)`` for a quantized weight; `qweight_from_parts` inverts it."""
    if isinstance(q, BCQWeight):
        return {"kind": "bcq", "prefix": prefix, "manifest": q.manifest()}, q.tensors(prefix)
    if isinstance(q, MultipointWeight):
        return {"kind": "multipoint", "prefix": prefix, "manifest": q.manifest()}, q.tensors(prefix)
    if isinstance(q, BlockScaledWeight):
        entry = {"kind": "block_scaled", "prefix": prefix, "spec": q.spec.to_dict(), "shape": list(q.shape)}
        return entry, q.tensors(prefix)
    if isinstance(q, UniformWeight):
        return ({"kind": "uniform", "prefix": prefix, "spec": q.spec.to_dict()},
                {prefix + "codes": q.codes, prefix + "scale": q.scale, prefix + "zero_point": q.zero_point})
    raise SpecError(f"cannot store a quantized weight of type {type(q).__name__}")


def tensor_names(entry: dict[str, Any]) -> set[str]:
    """The tensor names an entry refers to (for coverage checks)."""
    p = entry.get("prefix", "")
    if entry.get("kind") == "bcq":
        return {p + "planes", p + "alpha"} | ({p + "offset"} if entry["manifest"].get("has_offset") else set())
    if entry.get("kind") == "block_scaled":
        wide = int(entry["spec"].get("scale_bits") or 0) > 6
        return {p + n for n in ("codes", "super_scale", "super_min")} | (
            {p + "scale_codes", p + "min_codes"} if wide else {p + "scale_lo", p + "scale_hi"})
    if entry.get("kind") == "multipoint":
        extra = {f"{p}point{j + 2}.{n}" for j in range(int(entry["manifest"]["levels"])) for n in ("codes", "scale")}
        return {p + "codes", p + "scale", p + "zero_point", p + "counts"} | extra
    return {p + "codes", p + "scale", p + "zero_point"}


def qweight_from_parts(entry: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuild and validate a quantized weight from `qweight_parts`' output (raises `SpecError`)."""
    if not isinstance(entry, dict) or entry.get("kind") not in KINDS:
        kind = entry.get("kind") if isinstance(entry, dict) else entry
        raise SpecError(f"qweight.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    prefix = entry.get("prefix", "")
    if not isinstance(prefix, str):
        raise SpecError(f"qweight.prefix must be a string, got {prefix!r}")
    try:
        missing = sorted(n for n in tensor_names(entry) if n not in tensors)
        if missing:
            raise SpecError(f"tensor {missing[0]!r} is missing")
        if entry["kind"] == "bcq":
            q = BCQWeight.from_parts(entry["manifest"], tensors, prefix=prefix)
            if q.bits != int(entry["manifest"]["bits"]):
                raise SpecError(f"manifest says bits={entry['manifest']['bits']} but alpha holds {q.bits} planes")
            _finite(q.alpha, "alpha")
            if q.offset is not None:
                _finite(q.offset, "offset")
            return q
        if entry["kind"] == "block_scaled":
            q = BlockScaledWeight.from_tensors(QSpec.from_dict(entry["spec"]), tuple(entry["shape"]), tensors, prefix)
            _finite(q.super_scale, "super_scale")
            _finite(q.super_min, "super_min")
            return q
        if entry["kind"] == "multipoint":
            q = MultipointWeight.from_parts(entry["manifest"], tensors, prefix=prefix)
            _check_uniform(q.base)
            for j, s in enumerate(q.scales):
                _finite(s, f"point{j + 2}.scale")
            return q
        spec = QSpec.from_dict(entry["spec"])
        q = UniformWeight(tensors[prefix + "codes"], tensors[prefix + "scale"], tensors[prefix + "zero_point"], spec)
        _check_uniform(q)
        return q
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SpecError(f"malformed {entry.get('kind')} weight entry: {type(e).__name__}: {e}") from None


def _finite(t: torch.Tensor, name: str) -> None:
    if not torch.is_floating_point(t):
        raise SpecError(f"{name} must be floating point, got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise SpecError(f"{name} holds NaN or infinite values")


def _check_uniform(q: UniformWeight) -> None:
    spec = q.spec
    if q.codes.dtype not in _INT_DTYPES:
        raise SpecError(f"codes must be integers, got {q.codes.dtype}")
    if q.codes.numel():
        lo, hi = int(q.codes.min()), int(q.codes.max())
        if lo < spec.qmin or hi > spec.qmax:
            raise SpecError(f"codes span [{lo}, {hi}], outside the {spec.bits}-bit range [{spec.qmin}, {spec.qmax}] "
                            f"of the spec ({spec})")
    _finite(q.scale, "scale")
    if bool((q.scale <= 0).any()):
        raise SpecError("scale holds values ≤ 0")
    if q.zero_point.dtype not in _INT_DTYPES and not torch.is_floating_point(q.zero_point):
        raise SpecError(f"zero_point must be numeric, got {q.zero_point.dtype}")


def save_qweight(path: str | Path, q: Any) -> None:
    """One ``.safetensors`` file; the entry travels in its metadata header."""
    from safetensors.torch import save_file

    entry, tensors = qweight_parts(q)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
              metadata={"qgraph.qweight": json.dumps(entry)})


def load_qweight(path: str | Path) -> Any:
    """Read `save_qweight`'s file (validated; raises `SpecError` on anything malformed)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        entry = json.loads(meta["qgraph.qweight"])
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise SpecError(f"{path}: not a qgraph quantized-weight file ({type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError on bad headers
        raise SpecError(f"{path}: unreadable safetensors file: {e}") from None
    return qweight_from_parts(entry, tensors)
