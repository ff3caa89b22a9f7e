"""`BCQLinear`: an ``nn.Linear`` stand-in whose weight is a packed BCQ code, run by ``torch.ops.qgraph.biqgemm``."""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from qgraph.errors import KernelError
from qgraph.kernels import cpu
from qgraph.kernels.op import get_layout
from qgraph.quant.bcq_weight import BCQWeight
from qgraph.quant.block_scaled import BlockScaledWeight

_PREFERRED = {"cpu": (cpu.LAYOUT,), "cuda": ("cuda-lut8",)}


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A BCQ weight in some op layout: the tensors ``torch.ops.qgraph.biqgemm`` takes, plus the matrix facts."""

    layout: str
    packed: torch.Tensor
    alpha: torch.Tensor
    offset: torch.Tensor | None
    shape: tuple[int, int]
    group_size: int


def pack(w: BCQWeight | BlockScaledWeight, layout: str | None = None) -> PackedWeight:
    """Repack ``w`` for ``layout`` (default: the fastest layout for w's device that can take it, else "planes").

    A `BlockScaledWeight` on CPU takes ``cpu-lut4k`` (its scale codes as they are stored); elsewhere, or for another
    layout, its exact BCQ form."""
    if isinstance(w, BlockScaledWeight):
        if layout in (None, cpu.LAYOUT_K) and w.codes.device.type == "cpu":
            try:
                packed, alpha, offset = get_layout(cpu.LAYOUT_K).pack(w)
                return PackedWeight(cpu.LAYOUT_K, packed, alpha, offset, w.shape, w.group_size)
            except KernelError:
                if layout:
                    raise
        if layout == cpu.LAYOUT_K:
            raise KernelError(f"layout {cpu.LAYOUT_K!r} needs a CPU BlockScaledWeight")
        w = w.to_bcq()
    if not isinstance(w, BCQWeight):
        raise KernelError(f"pack() takes a BCQWeight or a BlockScaledWeight, got {type(w).__name__}")
    names = (layout,) if layout else _PREFERRED.get(w.alpha.device.type, ()) + ("planes",)
    last: KernelError | None = None
    for name in names:
        try:
            lay = get_layout(name)
            if lay.pack is None:
                raise KernelError(f"BiQGEMM layout {name!r} has no packer registered")
            packed, alpha, offset = lay.pack(w)
        except KernelError as e:
            if layout:
                raise
            last = e
            continue
        return PackedWeight(name, packed, alpha, offset, w.shape, w.group_size)
    raise last or KernelError("no BiQGEMM layout could pack this weight")


_PACK_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached_pack(w: BCQWeight) -> PackedWeight:
    p = _PACK_CACHE.get(w)
    if p is None:
        p = _PACK_CACHE[w] = pack(w)
    return p


def biqgemm(x: torch.Tensor, w, bias: torch.Tensor | None = None, mode: str = "exact") -> torch.Tensor:
    """``x @ Ŵᵀ + bias`` through ``torch.ops.qgraph.biqgemm``.

    ``w`` is a `BCQWeight` (packed for its device on first use and cached while w lives), a `PackedWeight`,
    or a `qgraph.kernels.cpu.CpuPackedWeight`.
    """
    if isinstance(w, (BCQWeight, BlockScaledWeight)):
        w = _cached_pack(w)
    if not all(hasattr(w, a) for a in ("layout", "packed", "alpha", "offset", "shape", "group_size")):
        raise KernelError(f"w must be a BCQWeight or a packed BCQ weight, got {type(w).__name__}")
    m, k = w.shape
    return torch.ops.qgraph.biqgemm(x, w.packed, w.alpha, w.offset, bias, m, k, w.group_size, w.layout, mode)


class BCQLinear(nn.Module):
    """``y = x @ Ŵᵀ + b`` with Ŵ a BCQ code held as packed buffers of one layout.

    The layout is picked once, from the weight's device (``cpu-lut4`` on CPU, ``cuda-lut8`` on CUDA when the
    Triton kernel is available, else ``planes``); ``layout="cuda-lut8-h"`` stores α and z in fp16 instead (12.5%
    fewer bytes at q=3, group 128; each α rounded to 11 significant bits). ``.to(device)`` moves the buffers but
    keeps the layout: after moving to another device type call `repack` (e.g. ``m.cuda().repack()``).
    ``state_dict`` holds the packed buffers and an extra-state record of the layout and shape; loading checks
    they match.
    """

    def __init__(
        self, weight: BCQWeight | BlockScaledWeight, bias: torch.Tensor | None = None, *, layout: str | None = None,
        mode: str = "exact",
    ) -> None:
        super().__init__()
        cpu.check_mode(mode)
        self.out_features, self.in_features = weight.shape
        self.group_size = weight.group_size
        self.bits = weight.bits
        self.mode = mode
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise KernelError(f"bias must have shape [{self.out_features}], got {tuple(bias.shape)}")
        self._set_packed(pack(weight, layout))
        b = None if bias is None else bias.detach().to(device=self.packed.device, dtype=torch.float32).clone()
        self.register_buffer("bias", b)

    def _set_packed(self, p: PackedWeight) -> None:
        self.layout = p.layout
        self.has_offset = p.offset is not None
        self.register_buffer("packed", p.packed.contiguous())
        self.register_buffer("alpha", p.alpha.contiguous())
        self.register_buffer("offset", None if p.offset is None else p.offset.contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear, w: BCQWeight | BlockScaledWeight, **kwargs) -> BCQLinear:
        """Replace ``linear`` (its bias is kept) by the BCQ code ``w`` of its weight."""
        if tuple(linear.weight.shape) != tuple(w.shape):
            raise KernelError(
                f"BCQ weight shape {tuple(w.shape)} does not match the Linear's weight {tuple(linear.weight.shape)}"
            )
        return cls(w, linear.bias, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qgraph.biqgemm(
            x, self.packed, self.alpha, self.offset, self.bias, self.out_features, self.in_features,
            self.group_size, self.layout, self.mode,
        )

    def bcq_weight(self) -> BCQWeight:
        """The canonical `BCQWeight` behind the packed buffers."""
        lay = get_layout(self.layout)
        if lay.unpack is None:
            raise KernelError(f"BiQGEMM layout {self.layout!r} has no unpacker registered")
        return lay.unpack(self.packed, self.alpha, self.offset, self.out_features, self.in_features,
                          self.group_size)

    def repack(self, layout: str | None = None) -> BCQLinear:
        """Re-lay the weight out for ``layout`` (default: the best one for the buffers' current device)."""
        w = self.bcq_weight().to(self.alpha.device)
        self._set_packed(pack(w, layout))
        return self

    def get_extra_state(self) -> dict:
        return {"layout": self.layout, "shape": [self.out_features, self.in_features], "bits": self.bits,
                "group_size": self.group_size, "mode": self.mode, "has_offset": self.has_offset}

    def set_extra_state(self, state: dict) -> None:
        mine = self.get_extra_state()
        for key in ("layout", "shape", "bits", "group_size", "has_offset"):
            if state.get(key) != mine[key]:
                raise KernelError(
                    f"BCQLinear state_dict has {key}={state.get(key)!r} but this module has {mine[key]!r}; build "
                    f"the module with the same weight geometry and layout before load_state_dict"
                )
        self.mode = state.get("mode", self.mode)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, offset={self.has_offset}, bias={self.bias is not None}, "
                f"layout={self.layout!r}, mode={self.mode!r}")
