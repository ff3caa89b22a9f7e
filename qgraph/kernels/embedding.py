"""`RowwiseQuantizedEmbedding`: an embedding table stored as per-row uniform codes (8 or ≤4 bits)."""
from __future__ import annotations

import torch
from torch import nn

from qgraph.errors import KernelError


class RowwiseQuantizedEmbedding(nn.Module):
    """``table[ids]`` dequantized row by row: ``(codes[ids] − z[ids]) · s[ids]``.

    Codes of ≤4 bits are stored two per byte (low nibble first), so the table takes bits/8 bytes per entry.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int):
        super().__init__()
        if codes.dim() != 2 or scale.shape != (codes.shape[0],) or zero_point.shape != (codes.shape[0],):
            raise KernelError(f"row-wise embedding needs codes [V, D] and per-row scale/zero point [V]; got "
                              f"{tuple(codes.shape)}, {tuple(scale.shape)}, {tuple(zero_point.shape)}")
        self.bits, self.dim = bits, codes.shape[1]
        # nibbles are unsigned: signed codes (−8..7) are stored +8, unsigned ones (0..15) as they are
        self.code_offset = 8 if bits <= 4 and codes.numel() and int(codes.min()) < 0 else 0
        if bits <= 4:
            u = codes.to(torch.int16) + self.code_offset
            if u.numel() and (int(u.min()) < 0 or int(u.max()) > 15):
                raise KernelError(f"{bits}-bit embedding codes span {int(codes.min())}..{int(codes.max())}, "
                                  f"which does not fit one nibble; quantize the table to {bits} bits first")
            u = u.to(torch.uint8)
            if self.dim % 2:
                u = torch.nn.functional.pad(u, (0, 1), value=0)
            codes = u[:, 0::2] | (u[:, 1::2] << 4)
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", scale.to(torch.float32).contiguous())
        self.register_buffer("zero_point", zero_point.to(torch.float32).contiguous())

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * 4 + self.zero_point.numel() * 4

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.codes[ids]
        if self.bits <= 4:
            lo = (rows & 0xF).to(torch.int8) - self.code_offset
            hi = (rows >> 4).to(torch.int8) - self.code_offset
            rows = torch.stack((lo, hi), dim=-1).flatten(-2)[..., : self.dim]
        return (rows.to(torch.float32) - self.zero_point[ids].unsqueeze(-1)) * self.scale[ids].unsqueeze(-1)
