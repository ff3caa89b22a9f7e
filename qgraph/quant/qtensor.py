"""`UniformWeight`: integer codes of a uniformly quantized weight with their qparams and spec."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qgraph.quant import uniform
from qgraph.quant.qspec import QSpec


@dataclass(frozen=True, eq=False)
class UniformWeight:
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    spec: QSpec

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def nbytes(self) -> int:
        """Bytes when stored packed at ``spec.bits`` per code, plus fp32 scales (and int zero points)."""
        n = (self.codes.numel() * self.spec.bits + 7) // 8 + self.scale.numel() * 4
        return n + (0 if self.spec.symmetric else self.zero_point.numel())

    def dequantize(self) -> torch.Tensor:
        return uniform.dequantize(self.codes, self.scale, self.zero_point, self.spec)


def weight_nbytes(qweight) -> int:
    return int(qweight.nbytes)
