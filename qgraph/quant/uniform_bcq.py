"""The exact BCQ form of a uniform code, so uniform 2-4-bit weights run on BiQGEMM.

A uniform b-bit code ``w = s (c − z)`` with ``c − qmin = Σ_i 2^i bit_i`` is *exactly* the BCQ code with
``α_i = s·2^(i−1)``, bit-plane ``B_i = 2·bit_i − 1`` and offset ``s ((2^b − 1)/2 + qmin − z)`` (the offset comes
free from the kernel's all-ones table entry).
"""
from __future__ import annotations

import torch

from qgraph.errors import SpecError
from qgraph.quant.bcq_weight import BCQWeight, pack_signs
from qgraph.quant.qtensor import UniformWeight


def uniform_to_bcq(w: UniformWeight) -> BCQWeight:
    """The BCQ code that stands for exactly the same matrix as a uniform weight ``[M, K]`` (rows along axis 0)."""
    spec = w.spec
    if w.codes.dim() != 2 or spec.axis != 0:
        raise SpecError(f"only [out, in] weights quantized along rows convert to BCQ; got codes "
                        f"{tuple(w.codes.shape)} with {spec}")
    m, k = w.codes.shape
    if spec.granularity == "tensor":
        scale, zp, gs = w.scale.reshape(1, 1).expand(m, 1), w.zero_point.reshape(1, 1).expand(m, 1), k
    elif spec.granularity == "channel":
        scale, zp, gs = w.scale.reshape(m, 1), w.zero_point.reshape(m, 1), k
    else:
        scale, zp, gs = w.scale.reshape(m, -1), w.zero_point.reshape(m, -1), spec.group_size
    scale = scale.to(torch.float32)
    b = spec.bits
    u = (w.codes.to(torch.int32) - spec.qmin).to(torch.uint8)  # 0 .. 2^b − 1
    planes = torch.stack([((u >> i) & 1) for i in range(b)])  # [b, M, K] of {0, 1}
    alpha = torch.stack([scale * float(2 ** (i - 1)) for i in range(b)])  # [b, M, G]
    offset = scale * ((2 ** b - 1) / 2 + spec.qmin - zp.to(torch.float32))
    return BCQWeight(pack_signs(planes).contiguous(), alpha.contiguous(), offset.contiguous(), (m, k), gs)
