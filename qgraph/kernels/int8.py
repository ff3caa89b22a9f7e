"""Modules that run lowered uniform-quantized layers for real: int8 x int8 GEMM / Conv2d and weight-only
int8 / int4 GEMM, plus a dequantize-on-the-fly fallback for specs no torch kernel takes.

Kernels (torch 2.13, CPU):
- `Int8Linear`: ``torch._int_mm`` (int8 x int8 -> int32, exact; on CPU it takes any M, K, N but is slow
  in torch 2.13) or oneDNN ``onednn.qlinear_pointwise`` (u8 x s8, fast). The asymmetric activation
  zero point is handled by precomputed weight row sums: y = s_x s_w (q_x W_q^T - z_x rowsum(W_q)) + b.
- `Int8Conv2d`: oneDNN ``onednn.qconv_prepack`` / ``onednn.qconv2d_pointwise`` on plain uint8 tensors
  (channels_last) with per-channel int8 weights and a fused ReLU / hardtanh; float32 output, or uint8
  codes with the next lowered conv's qparams so consecutive int8 convs skip a dequantize/quantize.
  These ops take ordinary uint8 tensors, so no torch.ao quantized tensor (and no deprecation warning)
  is involved; the fbgemm ``quantized::conv2d`` path needs quint8 tensors and requantizes its output.
- `Int8WeightOnlyLinear`: ``qgraph::int8_weight_only_linear`` (per-channel symmetric int8 weights): rows of the
  weight dequantized a chunk of at most `INT8_WO_CHUNK_BYTES` at a time into fp32 and multiplied with ``F.linear``
  (no dequantized copy of the whole weight). torch's ``aten._weight_int8pack_mm`` was 2-10x slower than that at
  one input row and 30-40x at 128 rows on this project's machines (576x576 .. 49152x576, one thread).
- `Int4WeightOnlyLinear`: ``aten._weight_int4pack_mm_for_cpu`` (group sizes 32/64/128/256, N padded to
  a multiple of 16; it computes w = (q_u4 - 8) s + z per group, so signed and asymmetric 2-4 bit codes
  are stored shifted into 4-bit containers and the zero point folded into z).
- `DequantLinear`: keeps the integer codes and dequantizes them on every call (any uniform spec).

On x86 CPUs without VNNI (AVX2), oneDNN multiplies u8 x s8 pairs with ``vpmaddubsw``, whose int16
pair sums saturate when activation codes use all 8 bits; `saturation_possible` says when that can
happen (activation codes spanning <= 128 levels, i.e. 7-bit activations, are always exact).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qgraph.errors import KernelError
from qgraph.kernels import onednn_ops  # noqa: F401 - registers qgraph::int8_conv2d / int8_linear

INT4_GROUP_SIZES = (32, 64, 128, 256)


@functools.cache
def cpu_has_vnni() -> bool:
    """True when the CPU has AVX512-VNNI or AVX-VNNI (int8 dot products accumulate in int32)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def saturation_possible(act_levels: int, weight_absmax: int = 128) -> bool:
    """Whether oneDNN's u8 x s8 kernels may saturate int16 pair sums on this CPU."""
    return not cpu_has_vnni() and 2 * (act_levels - 1) * weight_absmax > 32767


def _inv_scale(scale: float) -> float:
    # fake_quantize_per_tensor_affine multiplies by the float32 inverse; match it bit for bit.
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32))


class ActQuant:
    """Per-tensor activation qparams as the calibrate pass stores them (signed or unsigned codes
    ``[qmin, qmax]``) and their shifted forms for the kernels: uint8 codes ``q - qmin`` (zero point
    ``z - qmin``) for oneDNN, int8 codes for ``_int_mm``."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int):
        if not (qmax - qmin <= 255 and qmin < qmax):
            raise KernelError(f"activation codes [{qmin}, {qmax}] do not fit 8 bits")
        if not (qmin <= zero_point <= qmax) or not scale > 0 or not math.isfinite(scale):
            raise KernelError(f"bad activation qparams scale={scale}, zero_point={zero_point} for codes "
                              f"[{qmin}, {qmax}]; re-run calibrate")
        self.scale, self.zero_point, self.qmin, self.qmax = float(scale), int(zero_point), int(qmin), int(qmax)
        self.inv_scale = _inv_scale(self.scale)

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

    @property
    def u8_zero_point(self) -> int:
        return self.zero_point - self.qmin

    @property
    def s8_shift(self) -> int:
        """Added to a code to make it an int8 code (0 when ``[qmin, qmax]`` already fits int8)."""
        return 0 if self.qmin >= -128 and self.qmax <= 127 else -128

    def codes(self, x: torch.Tensor, shift: int, dtype: torch.dtype) -> torch.Tensor:
        """``clamp(round(x / s) + z, qmin, qmax) + shift`` as ``dtype``."""
        q = torch.mul(x.to(torch.float32), self.inv_scale).round_()
        return q.add_(self.zero_point + shift).clamp_(self.qmin + shift, self.qmax + shift).to(dtype)

    def u8(self, x: torch.Tensor) -> torch.Tensor:
        return self.codes(x, -self.qmin, torch.uint8)

    def s8(self, x: torch.Tensor) -> torch.Tensor:
        return self.codes(x, self.s8_shift, torch.int8)

    def __repr__(self) -> str:
        return f"ActQuant(scale={self.scale:.6g}, zero_point={self.zero_point}, codes=[{self.qmin}, {self.qmax}])"


class _PackedCache(nn.Module):
    """A module with an opaque prepacked weight (oneDNN tensors cannot be copied or saved): the cache is
    rebuilt from the integer buffers on first use after a copy / load."""

    def __init__(self) -> None:
        super().__init__()
        self._packed = None

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_packed"] = None
        return state

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def packed(self):
        if self._packed is None:
            self._packed = self._pack()
        return self._packed

    def _pack(self):
        raise NotImplementedError


def _channel_scales(scale: torch.Tensor, n: int) -> torch.Tensor:
    scale = scale.detach().to(torch.float32).reshape(-1)
    if scale.numel() == 1:
        return scale.expand(n).clone()
    if scale.numel() != n:
        raise KernelError(f"expected {n} per-channel weight scales (or one), got {scale.numel()}")
    return scale.clone()


def _check_codes(codes: torch.Tensor, what: str) -> None:
    if codes.dtype != torch.int8:
        raise KernelError(f"{what} needs signed int8 weight codes, got {codes.dtype}; quantize weights with a "
                          f"signed symmetric spec (e.g. int8/channel/sym)")


class Int8Linear(nn.Module):
    """``y = x @ W^T + b`` with x quantized per tensor and W int8 per output channel (symmetric).

    ``impl="int_mm"``: exact int32 accumulation with ``torch._int_mm``; ``impl="onednn"``: oneDNN
    ``qlinear_pointwise`` (exact unless `saturation_possible`). Accepts ``x`` of shape ``[..., K]``.
    """

    qgraph_op_type = "Int8Gemm"

    def __init__(self, codes: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 act: ActQuant, impl: str = "int_mm"):
        super().__init__()
        _check_codes(codes, "Int8Linear")
        if codes.dim() != 2:
            raise KernelError(f"Int8Linear needs a [N, K] weight, got shape {tuple(codes.shape)}")
        if impl not in ("int_mm", "onednn"):
            raise KernelError(f"Int8Linear impl must be 'int_mm' or 'onednn', got {impl!r}")
        n, k = codes.shape
        self.impl, self.act = impl, act
        self.in_features, self.out_features = k, n
        self.register_buffer("codes", codes.detach().contiguous())
        self.register_buffer("weight_scale", _channel_scales(weight_scale, n))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.register_buffer("row_sums", codes.detach().to(torch.int32).sum(dim=1))
        # s_x * s_w in float32, as the simulation's product of dequantized operands rounds it.
        self.register_buffer("out_scale", self.weight_scale * torch.tensor(act.scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise KernelError(f"Int8Linear expects inputs [..., {self.in_features}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.impl == "onednn":
            y = torch.ops.qgraph.int8_linear(self.act.u8(x2), self.act.scale, self.act.u8_zero_point, self.codes,
                                             self.weight_scale, self.bias)
        else:
            acc = int8_matmul(self.act.s8(x2), self.codes.t())
            z = self.act.zero_point + self.act.s8_shift
            if z:
                acc = acc - z * self.row_sums
            y = acc.to(torch.float32) * self.out_scale
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, impl={self.impl}, act_scale={self.act.scale:.4g}, " \
               f"act_zp={self.act.zero_point}"


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [K, N] -> int32 [M, N]: ``torch._int_mm`` where it runs (on CPU: any shape in
    torch 2.13; on CUDA it needs M > 16 and K, N multiples of 8), else an exact int32 matmul."""
    if a.shape[0] == 0:
        return torch.zeros(0, b.shape[1], dtype=torch.int32, device=a.device)
    if a.shape[1] == 1:  # torch 2.13's CPU _int_mm returns garbage for K = 1 with a transposed [N, 1] weight
        return a.to(torch.int32) @ b.to(torch.int32)
    try:
        return torch._int_mm(a, b)
    except RuntimeError:
        return a.to(torch.int32) @ b.to(torch.int32) if a.device.type == "cpu" else \
            (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)


_POST_OPS = ("none", "relu", "hardtanh")


class Int8Conv2d(nn.Module):
    """A 2-D convolution on oneDNN's int8 kernel with an optional fused ReLU / clamp.

    Inputs: float (quantized here with the calibrated qparams) or, when ``input_quantized``, uint8
    codes already in this layer's activation qparams. Output: float32, or uint8 codes in
    ``output_act``'s qparams when it is set (then the fused clamp also keeps codes in that range).
    """

    qgraph_op_type = "Int8Conv"

    def __init__(self, codes: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 act: ActQuant, *, stride, padding, dilation, groups: int,
                 post_op: str = "none", clamp: tuple[float, float] | None = None):
        super().__init__()
        _check_codes(codes, "Int8Conv2d")
        if codes.dim() != 4:
            raise KernelError(f"Int8Conv2d needs a [Cout, Cin/groups, kH, kW] weight, got {tuple(codes.shape)}")
        if post_op not in _POST_OPS:
            raise KernelError(f"Int8Conv2d post_op must be one of {_POST_OPS}, got {post_op!r}")
        if post_op == "hardtanh" and clamp is None:
            raise KernelError("Int8Conv2d post_op='hardtanh' needs clamp=(min, max)")
        self.act = act
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups = int(groups)
        self.post_op, self.clamp = post_op, clamp
        self.input_quantized = False
        self.output_act: ActQuant | None = None
        self.out_channels = codes.shape[0]
        self.register_buffer("codes", codes.detach().contiguous())
        self.register_buffer("weight_scale", _channel_scales(weight_scale, codes.shape[0]))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    def emit_codes(self, out: ActQuant) -> None:
        """Output uint8 codes in ``out``'s qparams (for a consumer that takes them) instead of float."""
        self.output_act = out

    def _epilogue(self) -> tuple[str, list]:
        if self.output_act is None:
            return self.post_op, [] if self.post_op != "hardtanh" else [float(self.clamp[0]), float(self.clamp[1])]
        o = self.output_act
        lo, hi = o.scale * (o.qmin - o.zero_point), o.scale * (o.qmax - o.zero_point)
        if self.post_op == "relu":
            lo = max(lo, 0.0)
        elif self.post_op == "hardtanh":
            lo, hi = max(lo, self.clamp[0]), min(hi, self.clamp[1])
        if o.levels == 256 and self.post_op == "none":
            return "none", []
        return "hardtanh", [lo, hi]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantized:
            if x.dtype != torch.uint8:
                raise KernelError(f"Int8Conv2d with input_quantized=True expects uint8 codes, got {x.dtype}")
            q = x
        else:
            if x.dim() != 4:
                raise KernelError(f"Int8Conv2d expects a 4-D NCHW input, got shape {tuple(x.shape)}")
            q = self.act.u8(x)
        q = q.contiguous(memory_format=torch.channels_last)
        attr, scalars = self._epilogue()
        if self.output_act is None:
            out_scale, out_zp, out_dtype = 1.0, 0, torch.float32
        else:
            out_scale, out_zp, out_dtype = self.output_act.scale, self.output_act.u8_zero_point, torch.uint8
        lo, hi = scalars if scalars else (0.0, 0.0)
        return torch.ops.qgraph.int8_conv2d(
            q, self.act.scale, self.act.u8_zero_point, self.codes, self.weight_scale, self.bias, self.stride,
            self.padding, self.dilation, self.groups, out_scale, out_zp, out_dtype == torch.uint8, attr, lo, hi)

    def extra_repr(self) -> str:
        k = tuple(self.codes.shape)
        out = "uint8" if self.output_act is not None else "float"
        return (f"weight={list(k)}, stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                f"post_op={self.post_op}, in={'uint8' if self.input_quantized else 'float'}, out={out}")


def _pair(v) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    v = [int(i) for i in v]
    return v * 2 if len(v) == 1 else v


# --- weight-only ---------------------------------------------------------------------------------
INT8_WO_CHUNK_BYTES = 1 << 20  # fp32 bytes of one dequantized chunk of weight rows (stays in L2)

_LIB = torch.library.Library("qgraph", "FRAGMENT")
_LIB.define("int8_weight_only_linear(Tensor x, Tensor codes, Tensor scale) -> Tensor")


def _int8_wo_impl(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    rows = max(1, INT8_WO_CHUNK_BYTES // (4 * k))
    if rows >= n:
        return F.linear(x, codes.to(torch.float32) * scale[:, None])
    return torch.cat([F.linear(x, codes[i:i + rows].to(torch.float32) * scale[i:i + rows, None])
                      for i in range(0, n, rows)], dim=-1)


def _int8_wo_fake(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


_LIB.impl("int8_weight_only_linear", _int8_wo_impl, "CompositeExplicitAutograd")
torch.library.register_fake("qgraph::int8_weight_only_linear", _int8_wo_fake, lib=_LIB)


class Int8WeightOnlyLinear(nn.Module):
    """``y = x @ (q s)^T + b`` with ``qgraph::int8_weight_only_linear`` (per-channel symmetric int8 codes)."""

    qgraph_op_type = "Int8WeightOnlyGemm"

    def __init__(self, codes: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        _check_codes(codes, "Int8WeightOnlyLinear")
        n, k = codes.shape
        self.in_features, self.out_features = k, n
        self.register_buffer("codes", codes.detach().contiguous())
        self.register_buffer("weight_scale", _channel_scales(weight_scale, n))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32)
        y = torch.ops.qgraph.int8_weight_only_linear(x2, self.codes, self.weight_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}"


class Int4WeightOnlyLinear(_PackedCache):
    """``y = x @ W^T + b`` with ``aten._weight_int4pack_mm_for_cpu``; W per group of ``group_size``
    columns is ``(q_u4 - 8) s + z``. Build it with `from_codes`."""

    qgraph_op_type = "Int4WeightOnlyGemm"

    def __init__(self, codes_u4: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None):
        super().__init__()
        if group_size not in INT4_GROUP_SIZES:
            raise KernelError(f"int4 weight-only kernel takes group sizes {INT4_GROUP_SIZES}, got {group_size}")
        n, k = codes_u4.shape
        if k % group_size or k % 2:
            raise KernelError(f"int4 weight-only kernel needs K ({k}) divisible by the group size {group_size}")
        if int(codes_u4.min()) < 0 or int(codes_u4.max()) > 15:
            raise KernelError("int4 container codes must lie in [0, 15]")
        self.in_features, self.out_features, self.group_size = k, n, group_size
        n_pad = -(-n // 16) * 16
        pad = n_pad - n
        c = F.pad(codes_u4.to(torch.int32), (0, 0, 0, pad), value=8)
        sz = torch.stack([F.pad(scales.to(torch.float32), (0, 0, 0, pad)),
                          F.pad(zeros.to(torch.float32), (0, 0, 0, pad))], dim=-1)  # [N_pad, G, 2]
        self.register_buffer("codes_u4", c.to(torch.uint8).contiguous())
        self.register_buffer("scales_and_zeros", sz.transpose(0, 1).contiguous())  # [G, N_pad, 2]
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                   group_size: int, bias: torch.Tensor | None) -> Int4WeightOnlyLinear:
        """From codes ``[N, K]`` in ``[qmin, qmin + 15]`` with ``w = (q - zp) s``; scale / zero point of
        shape ``[]`` (tensor), ``[N]`` (channel) or ``[N, K / group_size]`` (group)."""
        n, k = codes.shape
        g = k // group_size
        s = _per_group(scale, n, g)
        zp = _per_group(torch.as_tensor(zero_point).to(torch.float32), n, g)
        # container code u = q - qmin; w = (q - zp) s = (u - 8) s + (8 + qmin - zp) s
        zeros = (8 + qmin - zp) * s
        return cls(codes.to(torch.int32) - qmin, s, zeros, group_size, bias)

    def _pack(self):
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes_u4.to(torch.int32), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed(), self.group_size, self.scales_and_zeros)
        y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}"


def _per_group(p: torch.Tensor, n: int, g: int) -> torch.Tensor:
    p = p.detach().to(torch.float32)
    if p.numel() == 1:
        return p.reshape(1, 1).expand(n, g).clone()
    if p.dim() == 1 and p.shape[0] == n:
        return p.reshape(n, 1).expand(n, g).clone()
    if tuple(p.shape) == (n, g):
        return p.clone()
    raise KernelError(f"weight qparams of shape {tuple(p.shape)} do not fit [N={n}, groups={g}]")


class DequantLinear(nn.Module):
    """Weight-only fallback: keeps the integer codes and dequantizes them on each call, then runs the
    float op (``linear`` for ``[N, K]`` weights, ``matmul`` for ``[K, N]`` ones). Codes are held one per
    byte, so weights take 1 byte per element (not ``bits / 8``)."""

    qgraph_op_type = "DequantGemm"

    def __init__(self, qweight, bias: torch.Tensor | None, layout: str = "nk"):
        super().__init__()
        if layout not in ("nk", "kn"):
            raise KernelError(f"DequantLinear layout must be 'nk' or 'kn', got {layout!r}")
        self.spec, self.layout = qweight.spec, layout
        self.register_buffer("codes", qweight.codes.detach().clone())
        self.register_buffer("scale", torch.as_tensor(qweight.scale).detach().clone())
        self.register_buffer("zero_point", torch.as_tensor(qweight.zero_point).detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def weight(self) -> torch.Tensor:
        from qgraph.quant import uniform

        return uniform.dequantize(self.codes, self.scale, self.zero_point, self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight().to(x.dtype)
        if self.layout == "nk":
            return F.linear(x, w, self.bias)
        y = torch.matmul(x, w)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"weight={list(self.codes.shape)}, spec={self.spec}, layout={self.layout}"
