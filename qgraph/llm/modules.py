"""The modules a quantized causal LM runs on: every quantized weight becomes a BCQ code on BiQGEMM.

- `as_bcq`: a `BCQWeight` for any quantized weight qgraph's passes produce (a uniform code through its exact BCQ
  form, `qgraph.quant.uniform_bcq.uniform_to_bcq`), so uniform W4 runs on the same kernel.
- `BCQLinear` (from `qgraph.kernels.linear`) replaces each ``nn.Linear``.
- `BCQEmbedding`: ``table[ids]`` read row by row out of a BCQ code. Built on a `BCQLinear` (a tied LM head)
  it *shares* that module's packed buffers, so the tied table exists once, in the kernel's layout; built on
  a `BCQWeight` it keeps the canonical bit-planes. Rows are decoded with the same arithmetic as
  `BCQWeight.dequantize` (``Σ_i α_i B_i`` summed over planes, then ``+ z``).
"""
from __future__ import annotations

import torch
from torch import nn

from qgraph.errors import KernelError
from qgraph.kernels import cpu
from qgraph.kernels.linear import BCQLinear
from qgraph.quant.bcq_weight import BCQWeight
from qgraph.quant.block_scaled import BlockScaledWeight
from qgraph.quant.qtensor import UniformWeight
from qgraph.quant.uniform_bcq import uniform_to_bcq

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def as_bcq(q) -> BCQWeight:
    """A `BCQWeight` for a `BCQWeight` (itself), a `UniformWeight` or a `BlockScaledWeight` (their exact BCQ form)."""
    if isinstance(q, BCQWeight):
        return q
    if isinstance(q, UniformWeight):
        return uniform_to_bcq(q)
    if isinstance(q, BlockScaledWeight):
        return q.to_bcq()
    raise KernelError(f"no BiQGEMM form for a {type(q).__name__}")


def kernel_weight(q) -> BCQWeight | BlockScaledWeight:
    """What a `BCQLinear` packs: a `BlockScaledWeight` as it is (layout ``cpu-lut4k`` on CPU), else `as_bcq`."""
    return q if isinstance(q, BlockScaledWeight) else as_bcq(q)


def _expand(t: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    return t.repeat_interleave(group_size, dim=-1)[..., :k]


class BCQEmbedding(nn.Module):
    """An embedding whose table is a BCQ code: ``forward(ids) -> [..., dim]`` float32 rows."""

    def __init__(self, weight: BCQWeight | None = None, *, head: BCQLinear | None = None) -> None:
        super().__init__()
        if (weight is None) == (head is None):
            raise KernelError("BCQEmbedding takes a BCQWeight or a BCQLinear head to share, not both / neither")
        if head is not None:
            if head.layout not in ("planes", cpu.LAYOUT, cpu.LAYOUT_K):
                raise KernelError(f"BCQEmbedding cannot read rows from BiQGEMM layout {head.layout!r}")
            self.layout, self.num_embeddings, self.dim = head.layout, head.out_features, head.in_features
            self.group_size, self.bits = head.group_size, head.bits
            # the very same tensors as the head's buffers: the table is held once
            self.register_buffer("packed", head.packed)
            self.register_buffer("alpha", head.alpha)
            self.register_buffer("offset", head.offset)
        else:
            self.layout, (self.num_embeddings, self.dim) = "planes", weight.shape
            self.group_size, self.bits = weight.group_size, weight.bits
            self.register_buffer("packed", weight.planes.contiguous())
            self.register_buffer("alpha", weight.alpha.contiguous())
            self.register_buffer("offset", None if weight.offset is None else weight.offset.contiguous())
        if self.layout in (cpu.LAYOUT, cpu.LAYOUT_K):
            geo = cpu.Geometry(self.num_embeddings, self.dim, self.group_size)
            col = torch.arange(self.dim)
            cols = (col // geo.group_size) * geo.group_padded + col % geo.group_size
            self.register_buffer("cols", cols, persistent=False)
        self.tied = head is not None

    def _signs_alpha_offset(self, ids: torch.Tensor):
        k = self.dim
        if self.layout == "planes":
            by = self.packed[:, ids]  # [q, N, K/8]
            bits = (by.unsqueeze(-1) >> _SHIFTS.to(by.device)) & 1
            signs = bits.reshape(*by.shape[:-1], -1)[..., :k]  # [q, N, K]
            alpha = self.alpha[:, ids]  # [q, N, G]
            offset = None if self.offset is None else self.offset[ids]
            return signs, alpha, offset
        t, r = ids // cpu.TILE_ROWS, ids % cpu.TILE_ROWS
        mt, nb, q, _ = self.packed.shape
        by = self.packed.view(mt, nb, q, 4, cpu.TILE_ROWS)[t, :, :, :, r]  # [N, NB, q, 4]
        bits = (by.unsqueeze(-1) >> _SHIFTS.to(by.device)) & 1  # [N, NB, q, 4, 8]
        signs = bits.permute(2, 0, 1, 3, 4).reshape(q, ids.shape[0], nb * 32)[:, :, self.cols]  # [q, N, K]
        alpha = self.alpha[t, :, :, r].permute(2, 0, 1)  # [q, N, G]
        offset = None if self.offset is None else self.offset[t, :, r]  # [N, G]
        return signs, alpha, offset

    def _block_scaled_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``d·c − m`` of a ``cpu-lut4k`` table (the arithmetic of `BlockScaledWeight.dequantize`)."""
        t, r = ids // cpu.TILE_ROWS, ids % cpu.TILE_ROWS
        mt, nb, q, _ = self.packed.shape
        by = self.packed.view(mt, nb, q, 4, cpu.TILE_ROWS)[t, :, :, :, r]  # [N, NB, q, 4]
        bits = ((by.unsqueeze(-1) >> _SHIFTS.to(by.device)) & 1).to(torch.int32)  # [N, NB, q, 4, 8]
        bits = bits.permute(2, 0, 1, 3, 4).reshape(q, ids.shape[0], nb * 32)[:, :, self.cols]  # [q, N, K]
        codes = sum(bits[i] << i for i in range(q)).to(torch.float32)
        d, mn = cpu.kscale_rows(self.alpha, ids, self.dim // self.group_size)
        return _expand(d, self.group_size, self.dim) * codes - _expand(mn, self.group_size, self.dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if self.layout == cpu.LAYOUT_K:
            return self._block_scaled_rows(flat).reshape(*ids.shape, self.dim)
        signs, alpha, offset = self._signs_alpha_offset(flat)
        rows = (_expand(alpha, self.group_size, self.dim) * (signs.to(torch.float32) * 2 - 1)).sum(dim=0)
        if offset is not None:
            rows = rows + _expand(offset, self.group_size, self.dim)
        return rows.reshape(*ids.shape, self.dim)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table, dequantized (for inspection; the forward never builds it)."""
        return self.forward(torch.arange(self.num_embeddings, device=self.alpha.device))

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.dim}, bits={self.bits}, group_size={self.group_size}, "
                f"offset={self.offset is not None}, layout={self.layout!r}, tied={self.tied}")


# ------------------------------------------------------------------------------------------ shared-input fusion
# Sibling Linears that read the same tensor (attention q/k/v, a gated MLP's gate/up): one BiQGEMM call over
# their stacked rows builds the activation table once and streams all their weights in one pass.
FUSE_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


class _LastCall:
    """The input a fused group last ran on, its output, and how many members have not read that output yet."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.left = 0


class FusedBCQLinear(BCQLinear):
    """Several `BCQLinear` of one input width, group size, bit count and layout, stacked row-wise into one."""

    def __init__(self, parts: list[BCQLinear]) -> None:
        nn.Module.__init__(self)
        first = parts[0]
        why = _unfusable(parts)
        if why:
            raise KernelError(f"cannot fuse these BCQLinear modules: {why}")
        self.out_features = sum(p.out_features for p in parts)
        self.in_features, self.group_size, self.bits = first.in_features, first.group_size, first.bits
        self.mode, self.layout, self.has_offset = first.mode, first.layout, first.has_offset
        self.splits = [p.out_features for p in parts]
        self.register_buffer("packed", torch.cat([p.packed for p in parts]))
        self.register_buffer("alpha", torch.cat([p.alpha for p in parts]))
        self.register_buffer("offset", torch.cat([p.offset for p in parts]) if first.has_offset else None)
        bias = None
        if any(p.bias is not None for p in parts):
            bias = torch.cat([p.bias if p.bias is not None else p.packed.new_zeros(p.out_features, dtype=torch.float32)
                              for p in parts])
        self.register_buffer("bias", bias)


def _unfusable(parts: list[BCQLinear]) -> str:
    """Why ``parts`` cannot be stacked into one `FusedBCQLinear` ('' when they can)."""
    if len(parts) < 2 or not all(type(p) is BCQLinear for p in parts):
        return "need two or more plain BCQLinear modules"
    first = parts[0]
    for key in ("in_features", "group_size", "bits", "mode", "layout", "has_offset"):
        if len({getattr(p, key) for p in parts}) != 1:
            return f"their {key} differ"
    if first.layout not in (cpu.LAYOUT, cpu.LAYOUT_K) or any(p.out_features % cpu.TILE_ROWS for p in parts):
        return (f"only {cpu.LAYOUT} / {cpu.LAYOUT_K} weights with out_features a multiple of {cpu.TILE_ROWS} stack "
                "row-wise")
    if len({(p.packed.device, p.alpha.device) for p in parts}) != 1:
        return "their buffers live on different devices"
    return ""


class BCQSlice(nn.Module):
    """One member of a fused group: ``forward(x)`` is its rows of ``fused(x)``.

    The first member called with an input runs the fused op and keeps the output until every other member has
    read its rows (members called with another input run the fused op again, so the result never depends on
    the call order)."""

    def __init__(self, fused: FusedBCQLinear, index: int, last: _LastCall) -> None:
        super().__init__()
        self.fused = fused
        self.start = sum(fused.splits[:index])
        self.stop = self.start + fused.splits[index]
        self.out_features, self.in_features = fused.splits[index], fused.in_features
        self._last = last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = self._last
        if last.left > 0 and last.x is x:
            y = last.y
            last.left -= 1
            if last.left == 0:
                last.x = last.y = None
        else:
            y = self.fused(x)
            last.x, last.y, last.left = x, y, len(self.fused.splits) - 1
        return y[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return f"rows {self.start}:{self.stop} of a fused BiQGEMM ({self.fused.out_features} rows)"


def fuse_shared_inputs(model: nn.Module, groups: tuple[tuple[str, ...], ...] = FUSE_GROUPS) -> int:
    """Stack sibling `BCQLinear` modules that read the same input (``groups`` names them) into one BiQGEMM
    call each, in place; returns the number of fused groups. Groups that cannot stack are left alone."""
    done = 0
    for parent_name, parent in list(model.named_modules()):
        for names in groups:
            parts = [getattr(parent, n, None) for n in names]
            if any(not isinstance(p, BCQLinear) for p in parts) or _unfusable(parts):
                continue
            fused, last = FusedBCQLinear(parts), _LastCall()
            for i, n in enumerate(names):
                setattr(parent, n, BCQSlice(fused, i, last))
            done += 1
    return done
