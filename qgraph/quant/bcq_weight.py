"""`BCQWeight`: a binary-coding-quantized matrix, W ≈ z + Σ_i α_i ∘ B_i with B_i ∈ {−1,+1}.

Storage (the contract shared by quantizers, kernels and exporters):
- ``planes``: uint8 ``[q, M, ceil(K/8)]``; bit ``k % 8`` (LSB first) of byte ``k // 8`` is 1 where
  ``B_i[m, k] = +1`` and 0 where it is −1. Padding bits past K are 0.
- ``alpha``: float32 ``[q, M, G]`` with ``G = ceil(K / group_size)``; column k uses group ``k // group_size``.
- ``offset``: float32 ``[M, G]`` or None (the optional z).
Per-row scaling is ``group_size == K``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qgraph.errors import SpecError

_FORMAT = "qgraph.bcq/1"


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """Pack a ``[..., K]`` tensor of ±1 (or bool, True = +1) into uint8 ``[..., ceil(K/8)]``, LSB first."""
    bits = signs > 0
    k = bits.shape[-1]
    pad = (-k) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*bits.shape[:-1], -1, 8).to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=bits.device)
    return (bits * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_signs`: uint8 ``[..., ceil(K/8)]`` → int8 ``[..., K]`` of ±1."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    bits = bits.reshape(*packed.shape[:-1], -1)[..., :k]
    return bits.to(torch.int8) * 2 - 1


@dataclass(frozen=True, eq=False)
class BCQWeight:
    """A packed BCQ matrix of logical shape ``(out_features, in_features) = (M, K)``."""

    planes: torch.Tensor
    alpha: torch.Tensor
    offset: torch.Tensor | None
    shape: tuple[int, int]
    group_size: int

    def __post_init__(self) -> None:
        m, k = self.shape
        q = self.bits
        if q < 1 or q > 8:
            raise SpecError(f"BCQWeight: bits must be in 1..8, got {q} (alpha has shape {tuple(self.alpha.shape)})")
        if self.group_size < 1 or self.group_size > k:
            raise SpecError(f"BCQWeight: group_size must be in 1..K={k}, got {self.group_size}")
        g = self.num_groups
        expect = {
            "planes": ((q, m, (k + 7) // 8), torch.uint8),
            "alpha": ((q, m, g), torch.float32),
        }
        if self.offset is not None:
            expect["offset"] = ((m, g), torch.float32)
        for name, (shape, dtype) in expect.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise SpecError(
                    f"BCQWeight.{name}: expected {dtype} of shape {shape} for a {m}x{k} matrix with "
                    f"q={q}, group_size={self.group_size}; got {t.dtype} {tuple(t.shape)}"
                )

    @property
    def bits(self) -> int:
        return int(self.alpha.shape[0])

    @property
    def num_groups(self) -> int:
        return -(-self.shape[1] // self.group_size)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored representation (packed planes + fp32 α + fp32 z)."""
        n = self.planes.numel() + self.alpha.numel() * 4
        return n + (self.offset.numel() * 4 if self.offset is not None else 0)

    @classmethod
    def from_signs(
        cls,
        signs: torch.Tensor,
        alpha: torch.Tensor,
        offset: torch.Tensor | None = None,
        group_size: int | None = None,
    ) -> BCQWeight:
        """Build from unpacked signs ``[q, M, K]`` (±1), α ``[q, M, G]`` and optional z ``[M, G]``."""
        if signs.dim() != 3:
            raise SpecError(f"signs must be [q, M, K], got shape {tuple(signs.shape)}")
        _, m, k = signs.shape
        return cls(
            planes=pack_signs(signs).contiguous(),
            alpha=alpha.detach().to(torch.float32).contiguous(),
            offset=None if offset is None else offset.detach().to(torch.float32).contiguous(),
            shape=(int(m), int(k)),
            group_size=int(group_size or k),
        )

    def signs(self) -> torch.Tensor:
        """Unpacked bit-planes, int8 ``[q, M, K]`` of ±1."""
        return unpack_signs(self.planes, self.shape[1])

    def expand_groups(self, t: torch.Tensor) -> torch.Tensor:
        """Repeat a per-group tensor ``[..., G]`` along K to ``[..., K]``."""
        return t.repeat_interleave(self.group_size, dim=-1)[..., : self.shape[1]]

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix Ŵ ``[M, K]`` this BCQ code stands for."""
        w = (self.expand_groups(self.alpha) * self.signs().to(torch.float32)).sum(dim=0)
        if self.offset is not None:
            w = w + self.expand_groups(self.offset)
        return w

    def to(self, device: torch.device | str) -> BCQWeight:
        return BCQWeight(
            planes=self.planes.to(device),
            alpha=self.alpha.to(device),
            offset=None if self.offset is None else self.offset.to(device),
            shape=self.shape,
            group_size=self.group_size,
        )

    # --- serialization: tensors in safetensors, the rest as JSON metadata -----------------
    def manifest(self) -> dict:
        return {
            "format": _FORMAT,
            "shape": list(self.shape),
            "bits": self.bits,
            "group_size": self.group_size,
            "has_offset": self.offset is not None,
        }

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {f"{prefix}planes": self.planes, f"{prefix}alpha": self.alpha}
        if self.offset is not None:
            out[f"{prefix}offset"] = self.offset
        return out

    @classmethod
    def from_parts(cls, manifest: dict, tensors: dict[str, torch.Tensor], prefix: str = "") -> BCQWeight:
        if manifest.get("format") != _FORMAT:
            raise SpecError(f"not a qgraph BCQ weight manifest (format={manifest.get('format')!r})")
        # exact JSON types: a manifest that loads means what it says (0 for false, "32" for 32 are refused)
        if "has_offset" in manifest and not isinstance(manifest["has_offset"], bool):
            raise SpecError(f"BCQ manifest has_offset must be true or false, got {manifest['has_offset']!r}")
        for key in ("bits", "group_size"):
            v = manifest.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise SpecError(f"BCQ manifest {key} must be an integer, got {v!r}")
        shape = manifest.get("shape")
        if shape is not None and (not isinstance(shape, list)
                                  or any(isinstance(d, bool) or not isinstance(d, int) for d in shape)):
            raise SpecError(f"BCQ manifest shape must be a list of integers, got {shape!r}")
        try:
            return cls(
                planes=tensors[f"{prefix}planes"],
                alpha=tensors[f"{prefix}alpha"],
                offset=tensors.get(f"{prefix}offset") if manifest["has_offset"] else None,
                shape=tuple(int(s) for s in manifest["shape"]),
                group_size=int(manifest["group_size"]),
            )
        except KeyError as e:
            raise SpecError(f"BCQ weight is missing tensor or field {e}; the file is incomplete") from None

    def save(self, path: str | Path) -> None:
        """Write one ``.safetensors`` file; the JSON manifest travels in its metadata header."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}
        save_file(tensors, str(path), metadata={"qgraph": json.dumps(self.manifest())})

    @classmethod
    def load(cls, path: str | Path) -> BCQWeight:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "qgraph" not in meta:
                raise SpecError(f"{path}: no qgraph manifest in the safetensors metadata")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        return cls.from_parts(json.loads(meta["qgraph"]), tensors)
