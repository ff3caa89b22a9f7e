"""The BiQGEMM CPU kernel: ctypes binding of ``_biqgemm_cpu`` (plain C ABI, see ``csrc/biqgemm.h``) and the
offline ``"cpu-lut4"`` packing. ``torch.ops.qgraph.biqgemm`` reaches the same kernel through the native dispatcher
shim (`qgraph.kernels.native`) once it is built, without the Python checks and ctypes of `biqgemm_cpu`.

Layout ``cpu-lut4`` (``Mt = ceil(M/32)`` row tiles; each α-group of K is padded to ``gp = roundup(group_size, 32)``
columns, ``NB = G·gp/32`` blocks of 32 columns, so no block straddles two groups):
- ``packed``: uint8 ``[Mt, NB, q, 128]``; byte ``[t, b, i, 32p + r]`` holds row ``32t + r``'s bits of plane i for
  columns ``8p .. 8p+7`` of block b: the low nibble is the μ=4 key of columns ``8p..8p+3``, the high nibble
  that of ``8p+4..8p+7`` (LSB = first column, 1 ↔ +1). Padding rows and columns are 0.
- ``alpha``: float32 ``[Mt, G, q, 32]``; ``offset``: float32 ``[Mt, G, 32]`` or None (0 in padding rows).

Paths (``path="auto"`` picks by the number of input rows n: LUT while ``n <= lut_max_rows(mode)``, GEMM above;
the threshold is per process, from ``QGRAPH_BIQGEMM_LUT_MAX_ROWS``, `set_lut_max_rows` / `apply_cost_figures`, else
the x86-avx2 target's measured ``cost.biqgemm_lut_max_rows``):
- LUT (few rows, decode): per input row and block of 32 activations, eight μ=4 tables of 16 signed sums, indexed
  by the packed keys. Work grows with rows × q, so it wins only at a handful of rows.
- GEMM (many rows): each work item decodes one 32-row tile of the code, a chunk of K at a time, into a per-thread
  buffer (≤ 256 KiB; `gemm_buffers`) and runs a register-blocked micro-kernel over every input row; the weight is
  never dequantized as a whole. Exact mode decodes to fp32 and runs fp32 FMAs (AVX-512 12×32, AVX2 6×16 tiles).
  Fast mode on AVX-512 VNNI decodes to int8 (one scale per row and group) and quantizes x to int8 (one scale per
  row and segment of ≤ 256 columns inside a group), summing with ``vpdpbusd`` as llama.cpp's Q8 dot does;
  without VNNI fast mode's GEMM path is the exact fp32 one.

Modes:
- ``"exact"``: fp32 tables / fp32 decode; matches `biqgemm_reference` to fp32 rounding (tests: ≤ 1e-5 relative,
  where relative error is ``max|y − y_ref| / max|y_ref|`` over the whole output).
- ``"fast"``, LUT path: each block's eight 16-entry tables are quantized to int8 with one scale
  ``s_b = max_chunk Σ|x_c| / 127`` (a scale per 32 activations) and looked up 32 rows per ``vpshufb``.
  Every entry is off by at most ``s_b/2``, so per output element (see `fast_error_bound`)
  ``|y − y_exact| ≤ Σ_b 4·s_b·Σ_i |α_{i,g(b)}|`` (8 lookups per block and plane; z·Σx and bias are exact),
  which is also ``≤ (4/127)·‖x‖₁·max_g Σ_i |α_{i,g}|``.
- ``"fast"``, GEMM path (int8): ``|y − y_exact| ≤ Σ_seg e_w·Σ|x_k| + (s_x/2)·Σ|ŵ_k| + e_w·(s_x/2)·|seg|`` with
  ``e_w = s_w·(1/2 + (q+2)/512)`` (16-bit fixed-point decode, then rounding to int8), ``s_w = (|z| + Σ|α_i|)/127``,
  ``s_x = max_seg|x|/127`` (`fast_error_bound(..., path="gemm")`).
  Rounding errors are independent, so on real data the error is far below these worst cases: measured max relative
  error 3e-3 to 9e-3 (LUT) and 5e-3 to 1e-2 (GEMM) for Gaussian x, random codes, K = 64..4096 (the bench reports
  it per case; tests assert the elementwise bounds on every case and ≤ 1e-2 on Gaussian data).

ISA paths (chosen per call with ``__builtin_cpu_supports``; ``QGRAPH_BIQGEMM_ISA=scalar|avx2|avx512vbmi``
forces one, read on every call): ``avx2`` (AVX2 + FMA), ``avx512vbmi`` (AVX-512 F/BW/VL/VBMI: ``vpermb`` over four
tables, 16-lane ``vpermps``; the GEMM path's int8 kernel also needs VNNI; tested on Zen 4) and the portable
``scalar`` path.

x may be fp32/bf16/fp16 with any strides (it is made a contiguous fp32 copy when it is not one already); the
packed tensors must be contiguous CPU tensors of the layout above. Because the layout pads rows to tiles of 32
and groups to 32 columns, ``out_features``/``in_features`` are validated up to that padding: a wrong value
within it reads padding (zeros), never out of bounds.
"""
from __future__ import annotations

import ctypes
import importlib.util
import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from qgraph.errors import KernelError
from qgraph.quant.bcq_weight import BCQWeight, pack_signs, unpack_signs
from qgraph.quant.block_scaled import BlockScaledWeight

LAYOUT = "cpu-lut4"
LAYOUT_K = "cpu-lut4k"  # uniform codes with block scales (qgraph.quant.block_scaled): the alpha slot holds its codes
MODE_KSCALES = 0x10
K_HEAD, K_GROUP = 128, 48
TILE_ROWS = 32
BLOCK_K = 32
ABI_VERSION = 3
ISAS = ("scalar", "avx2", "avx512vbmi")
MODES = {"exact": 0, "fast": 1}
PATHS = {"auto": 0, "lut": 1, "gemm": 2}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    spec = importlib.util.find_spec("qgraph.kernels._biqgemm_cpu")
    if spec is None or not spec.origin:
        raise KernelError(
            "the BiQGEMM CPU extension is not built; run `pip install --no-build-isolation -e .` in the "
            "qgraph checkout (needs a C++17 compiler)"
        )
    lib = ctypes.CDLL(spec.origin)
    sigs = {
        "qg_biqgemm_abi_version": (_int, []),
        "qg_biqgemm_isa": (ctypes.c_char_p, []),
        "qg_biqgemm_isa_supported": (_int, [ctypes.c_char_p]),
        "qg_biqgemm_set_num_threads": (None, [_int]),
        "qg_biqgemm_packed_bytes": (_i64, [_i64, _i64, _int, _i64]),
        "qg_biqgemm_alpha_floats": (_i64, [_i64, _i64, _int, _i64]),
        "qg_biqgemm_offset_floats": (_i64, [_i64, _i64, _i64]),
        "qg_biqgemm_pack": (_int, [_ptr, _i64, _i64, _int, _i64, _ptr]),
        "qg_biqgemm_pack_alpha": (_int, [_ptr, _i64, _i64, _int, _i64, _ptr]),
        "qg_biqgemm_pack_offset": (_int, [_ptr, _i64, _i64, _i64, _ptr]),
        "qg_biqgemm_f32": (_int, [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _int, _i64, _int, _ptr]),
        "qg_biqgemm_f32_path": (_int, [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _int, _i64, _int, _int,
                                       _ptr]),
        "qg_biqgemm_set_lut_max_rows": (None, [_int, _i64]),
        "qg_biqgemm_gemm_int8": (_int, [_int]),
        "qg_biqgemm_gemm_buffers": (_int, [_i64, _i64, _i64, _int, _i64, _int, _ptr]),
        "qg_biqgemm_lut_max_rows": (_i64, [_int]),
        "qg_biqgemm_lut_tiles": (_int, [_ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _int, _i64, _int, _i64, _i64,
                                        _ptr]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    if lib.qg_biqgemm_abi_version() != ABI_VERSION:
        raise KernelError(
            f"the built BiQGEMM extension has ABI {lib.qg_biqgemm_abi_version()}, this Python expects "
            f"{ABI_VERSION}; rebuild with `pip install --no-build-isolation -e .`"
        )
    return lib


def available() -> bool:
    """Whether the compiled CPU kernel can be loaded."""
    try:
        _lib()
    except (KernelError, OSError):
        return False
    return True


def _check_isa_env() -> None:
    want = os.environ.get("QGRAPH_BIQGEMM_ISA", "")
    if not want:
        return
    if want not in ISAS:
        raise KernelError(f"QGRAPH_BIQGEMM_ISA={want!r} is not one of {ISAS}; unset it or pick one of those")
    if not _lib().qg_biqgemm_isa_supported(want.encode()):
        raise KernelError(
            f"QGRAPH_BIQGEMM_ISA={want!r} but this CPU cannot run that path; supported: {supported_isas()}"
        )


def isa() -> str:
    """The code path the kernel takes now: ``"avx512vbmi"`` (untested here), ``"avx2"`` or ``"scalar"``."""
    _check_isa_env()
    return _lib().qg_biqgemm_isa().decode()


def supported_isas() -> tuple[str, ...]:
    return tuple(n for n in ISAS if _lib().qg_biqgemm_isa_supported(n.encode()))


def _sync_threads() -> None:
    # Every call (not only on change): the native op sets the same kernel's thread count too.
    _lib().qg_biqgemm_set_num_threads(torch.get_num_threads())


# ------------------------------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class Geometry:
    """Sizes of the ``cpu-lut4`` layout for an ``M × K`` matrix with ``group_size``."""

    m: int
    k: int
    group_size: int

    @property
    def tiles(self) -> int:
        return -(-self.m // TILE_ROWS)

    @property
    def groups(self) -> int:
        return -(-self.k // self.group_size)

    @property
    def group_padded(self) -> int:
        return -(-self.group_size // BLOCK_K) * BLOCK_K

    @property
    def blocks(self) -> int:
        return self.groups * self.group_padded // BLOCK_K

    def packed_shape(self, q: int) -> tuple[int, int, int, int]:
        return (self.tiles, self.blocks, q, 4 * TILE_ROWS)

    def alpha_shape(self, q: int) -> tuple[int, int, int, int]:
        return (self.tiles, self.groups, q, TILE_ROWS)

    def offset_shape(self) -> tuple[int, int, int]:
        return (self.tiles, self.groups, TILE_ROWS)

    @property
    def segment_blocks(self) -> int:
        """Blocks per activation-scale segment of the int8 GEMM path: the largest divisor of the blocks per group
        that is <= 8 (so a segment holds <= 256 columns and never straddles a group)."""
        bpg = self.group_padded // BLOCK_K
        return next(s for s in range(8, 0, -1) if bpg % s == 0)


@dataclass(frozen=True, eq=False)
class CpuPackedWeight:
    """A `BCQWeight` repacked for the CPU kernel (layout ``cpu-lut4``)."""

    packed: torch.Tensor
    alpha: torch.Tensor
    offset: torch.Tensor | None
    shape: tuple[int, int]
    group_size: int
    layout: str = LAYOUT

    @property
    def bits(self) -> int:
        return int(self.packed.shape[2])

    @property
    def nbytes(self) -> int:
        n = self.packed.numel() + self.alpha.numel() * self.alpha.element_size()
        return n + (0 if self.offset is None else self.offset.numel() * 4)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.packed, self.alpha, self.offset


def pack(w: BCQWeight) -> CpuPackedWeight:
    """Repack a `BCQWeight` (any device; the result is on CPU) into the ``cpu-lut4`` layout."""
    if not isinstance(w, BCQWeight):
        raise KernelError(f"pack() takes a BCQWeight, got {type(w).__name__}")
    lib = _lib()
    m, k = w.shape
    q, gs = w.bits, w.group_size
    geo = Geometry(m, k, gs)
    planes = w.planes.detach().cpu().contiguous()
    alpha = w.alpha.detach().cpu().to(torch.float32).contiguous()
    packed = torch.empty(geo.packed_shape(q), dtype=torch.uint8)
    alpha_p = torch.empty(geo.alpha_shape(q), dtype=torch.float32)
    assert packed.numel() == lib.qg_biqgemm_packed_bytes(m, k, q, gs)
    assert alpha_p.numel() == lib.qg_biqgemm_alpha_floats(m, k, q, gs)
    rc = lib.qg_biqgemm_pack(planes.data_ptr(), m, k, q, gs, packed.data_ptr())
    rc |= lib.qg_biqgemm_pack_alpha(alpha.data_ptr(), m, k, q, gs, alpha_p.data_ptr())
    offset_p = None
    if w.offset is not None:
        offset = w.offset.detach().cpu().to(torch.float32).contiguous()
        offset_p = torch.empty(geo.offset_shape(), dtype=torch.float32)
        rc |= lib.qg_biqgemm_pack_offset(offset.data_ptr(), m, k, gs, offset_p.data_ptr())
    if rc != 0:
        raise KernelError(f"packing a {m}x{k} q={q} group_size={gs} BCQ weight failed (code {rc})")
    return CpuPackedWeight(packed, alpha_p, offset_p, (m, k), gs)


def _real_columns(geo: Geometry) -> torch.Tensor:
    """Index of each real column k in the padded column space (``g·gp + j``)."""
    k = torch.arange(geo.k)
    return (k // geo.group_size) * geo.group_padded + k % geo.group_size


def unpack(p: CpuPackedWeight) -> BCQWeight:
    """Inverse of `pack` (pure torch)."""
    m, k = p.shape
    geo, q = Geometry(m, k, p.group_size), p.bits
    mp = geo.tiles * TILE_ROWS
    # Byte p of a block for row r is the canonical LSB-first byte of that block's columns 8p..8p+7.
    by = p.packed.reshape(geo.tiles, geo.blocks, q, 4, TILE_ROWS).permute(2, 0, 4, 1, 3).reshape(q, mp, -1)
    signs = unpack_signs(by, geo.blocks * BLOCK_K)[:, :m][:, :, _real_columns(geo).to(by.device)]
    alpha = p.alpha.permute(2, 0, 3, 1).reshape(q, mp, geo.groups)[:, :m]
    offset = None if p.offset is None else p.offset.permute(0, 2, 1).reshape(mp, geo.groups)[:m]
    return BCQWeight(pack_signs(signs).contiguous(), alpha.contiguous(),
                     None if offset is None else offset.contiguous(), (m, k), p.group_size)


def pack_block_scaled(w: BlockScaledWeight) -> CpuPackedWeight:
    """Repack a `BlockScaledWeight` into the ``cpu-lut4k`` layout: the code's bit-planes as in ``cpu-lut4``, and its
    scale codes and row scales as one uint8 buffer ``[Mt, 128 + 48 G]`` (``csrc/biqgemm.h``)."""
    if not isinstance(w, BlockScaledWeight):
        raise KernelError(f"pack_block_scaled() takes a BlockScaledWeight, got {type(w).__name__}")
    if w.spec.scale_bits > 6:
        raise KernelError(f"the CPU block-scale layout holds scale codes of up to 6 bits, got {w.spec}; "
                          "use scale_bits <= 6 or run the weight's BCQ form (BlockScaledWeight.to_bcq())")
    lib = _lib()
    m, k = w.shape
    q, gs = w.bits, w.group_size
    geo = Geometry(m, k, gs)
    planes = w.packed_planes().contiguous()
    packed = torch.empty(geo.packed_shape(q), dtype=torch.uint8)
    if lib.qg_biqgemm_pack(planes.data_ptr(), m, k, q, gs, packed.data_ptr()) != 0:
        raise KernelError(f"packing a {m}x{k} q={q} group_size={gs} block-scaled weight failed")
    mt, g, mp = geo.tiles, geo.groups, geo.tiles * TILE_ROWS

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t.cpu(), t.new_zeros((mp - m, *t.shape[1:]))]) if mp > m else t.cpu()

    sc, mc = pad(w.scale_codes).to(torch.int32), pad(w.min_codes).to(torch.int32)
    head = torch.cat([pad(w.super_scale).view(mt, TILE_ROWS), pad(w.super_min).view(mt, TILE_ROWS)], 1)
    lo = ((sc & 15) | ((mc & 15) << 4)).view(mt, TILE_ROWS, g).permute(0, 2, 1)  # [Mt, G, 32]
    hi = ((sc >> 4) | ((mc >> 4) << 2)).view(mt, TILE_ROWS, g).permute(0, 2, 1)
    hi = hi[:, :, :16] | (hi[:, :, 16:] << 4)  # [Mt, G, 16]
    groups = torch.cat([lo, hi], 2).to(torch.uint8).reshape(mt, g * K_GROUP)
    kscales = torch.cat([head.contiguous().view(torch.uint8), groups], 1).contiguous()
    return CpuPackedWeight(packed, kscales, None, (m, k), gs, LAYOUT_K)


def _kscale_codes(kscales: torch.Tensor, rows: torch.Tensor, groups: int):
    """Scale codes ``sc``, ``mc`` ``[N, G]`` (int32) and row scales ``D``, ``M`` ``[N]`` (fp16) of matrix ``rows``
    in a ``cpu-lut4k`` buffer (layout in ``csrc/biqgemm.h``)."""
    t, r = rows // TILE_ROWS, rows % TILE_ROWS
    head = kscales[:, :K_HEAD].contiguous().view(torch.float16).view(-1, 2, TILE_ROWS)  # [Mt, 2, 32]
    gb = kscales[t, K_HEAD:].view(-1, groups, K_GROUP).to(torch.int32)  # [N, G, 48]
    lo = gb.gather(2, r.view(-1, 1, 1).expand(-1, groups, 1)).squeeze(2)
    hb = gb.gather(2, (TILE_ROWS + r % 16).view(-1, 1, 1).expand(-1, groups, 1)).squeeze(2)
    h = (hb >> (4 * (r // 16)).view(-1, 1)) & 15
    return (lo & 15) | ((h & 3) << 4), (lo >> 4) | ((h >> 2) << 4), head[t, 0, r], head[t, 1, r]


def kscale_rows(kscales: torch.Tensor, rows: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``d``, ``m`` ``[N, G]`` (fp32, the kernel's arithmetic) of matrix ``rows`` from a ``cpu-lut4k`` buffer."""
    sc, mc, sup_d, sup_m = _kscale_codes(kscales, rows, groups)
    return sup_d.float()[:, None] * sc.float(), sup_m.float()[:, None] * mc.float()


def unpack_block_scaled(p: CpuPackedWeight) -> BlockScaledWeight:
    """Inverse of `pack_block_scaled` for 4-bit-or-less codes (pure torch; scale_bits read back as 6)."""
    from qgraph.quant.qspec import QSpec

    m, k = p.shape
    geo, q = Geometry(m, k, p.group_size), p.bits
    mp = geo.tiles * TILE_ROWS
    by = p.packed.reshape(geo.tiles, geo.blocks, q, 4, TILE_ROWS).permute(2, 0, 4, 1, 3).reshape(q, mp, -1)
    bits = (unpack_signs(by, geo.blocks * BLOCK_K)[:, :m][:, :, _real_columns(geo)] > 0).to(torch.int32)
    codes = sum(bits[i] << i for i in range(q)).to(torch.uint8)
    sc, mc, sup_d, sup_m = _kscale_codes(p.alpha, torch.arange(m), geo.groups)
    spec = QSpec.uniform(q, signed=False, symmetric=False, granularity="group", group_size=p.group_size,
                         scale_bits=6)
    return BlockScaledWeight(codes, sc.to(torch.uint8), mc.to(torch.uint8), sup_d.contiguous(), sup_m.contiguous(),
                             spec)


# ------------------------------------------------------------------------------------------ checks
# Messages are only formatted on failure: these checks run on every call.
def check_activation(x: torch.Tensor, in_features: int, device: str | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise KernelError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise KernelError(f"x must be float32, bfloat16 or float16, got {x.dtype}; cast it first")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise KernelError(f"x must have shape [..., {in_features}] (in_features), got {tuple(x.shape)}")
    if device is not None and x.device.type != device:
        raise KernelError(f"x is on {x.device} but this kernel runs on {device}; move it there")


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise KernelError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise KernelError(f"cpu-lut4 {name} is on {t.device}; the CPU kernel needs CPU tensors")
    if not t.is_contiguous():
        raise KernelError(f"cpu-lut4 {name} must be contiguous (repack with qgraph.kernels.cpu.pack)")


def check_packed(
    packed: torch.Tensor,
    alpha: torch.Tensor,
    offset: torch.Tensor | None,
    out_features: int,
    in_features: int,
    group_size: int,
) -> int:
    """Validate ``cpu-lut4`` tensors against the declared matrix; returns the number of bit-planes q.

    The layout pads rows to tiles of 32 and groups to multiples of 32 columns, so out_features and in_features
    are checked up to that padding (padding rows read as zeros; nothing is ever read out of bounds)."""
    if out_features < 1 or in_features < 1:
        raise KernelError(f"out_features and in_features must be >= 1, got {out_features}, {in_features}")
    if not 1 <= group_size <= in_features:
        raise KernelError(f"group_size must be in 1..in_features={in_features}, got {group_size}")
    _check_tensor("packed", packed)
    _check_tensor("alpha", alpha)
    if alpha.dtype == torch.uint8:
        return _check_packed_k(packed, alpha, offset, out_features, in_features, group_size)
    if alpha.dtype != torch.float32 or alpha.dim() != 4:
        raise KernelError(f"cpu-lut4 alpha must be float32 [Mt, G, q, 32], got {alpha.dtype} {tuple(alpha.shape)}")
    q = alpha.shape[2]
    if not 1 <= q <= 8:
        raise KernelError(f"cpu-lut4 alpha has q={q} bit-planes; 1..8 are supported")
    tiles = -(-out_features // TILE_ROWS)
    groups = -(-in_features // group_size)
    blocks = groups * (-(-group_size // BLOCK_K))
    if alpha.shape != (tiles, groups, q, TILE_ROWS):
        raise KernelError(f"cpu-lut4 alpha shape {tuple(alpha.shape)} does not fit a {out_features}x{in_features} "
                          f"matrix with q={q}, group_size={group_size} (expected {(tiles, groups, q, TILE_ROWS)})")
    if packed.dtype != torch.uint8 or packed.shape != (tiles, blocks, q, 4 * TILE_ROWS):
        raise KernelError(f"cpu-lut4 packed must be uint8 {(tiles, blocks, q, 4 * TILE_ROWS)} for a "
                          f"{out_features}x{in_features} matrix with q={q}, group_size={group_size}; got "
                          f"{packed.dtype} {tuple(packed.shape)}")
    if offset is not None:
        _check_tensor("offset", offset)
        if offset.dtype != torch.float32 or offset.shape != (tiles, groups, TILE_ROWS):
            raise KernelError(f"cpu-lut4 offset must be float32 {(tiles, groups, TILE_ROWS)} for this matrix, got "
                              f"{offset.dtype} {tuple(offset.shape)}")
    return q


def _check_packed_k(packed, kscales, offset, out_features, in_features, group_size) -> int:
    geo = Geometry(out_features, in_features, group_size)
    if offset is not None:
        raise KernelError("cpu-lut4k weights carry their offsets in the block-scale buffer; pass offset=None")
    want = (geo.tiles, K_HEAD + K_GROUP * geo.groups)
    if kscales.dim() != 2 or tuple(kscales.shape) != want:
        raise KernelError(f"cpu-lut4k block scales must be uint8 {want} for a {out_features}x{in_features} matrix "
                          f"with group_size={group_size}, got {tuple(kscales.shape)}")
    if packed.dtype != torch.uint8 or packed.dim() != 4 or packed.shape[:2] != (geo.tiles, geo.blocks) \
            or packed.shape[3] != 4 * TILE_ROWS or not 1 <= packed.shape[2] <= 8:
        raise KernelError(f"cpu-lut4k packed must be uint8 {(geo.tiles, geo.blocks, 'q', 4 * TILE_ROWS)} with q in "
                          f"1..8 for a {out_features}x{in_features} matrix, got {packed.dtype} {tuple(packed.shape)}")
    return int(packed.shape[2])


def check_bias(bias: torch.Tensor | None, out_features: int, device: torch.device) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or bias.dtype not in FLOAT_DTYPES:
        raise KernelError(f"bias must be a float tensor or None, got {getattr(bias, 'dtype', type(bias).__name__)}")
    if bias.dim() != 1 or bias.shape[0] != out_features:
        raise KernelError(f"bias must have shape [{out_features}] (out_features), got {tuple(bias.shape)}")
    if bias.device != device:
        raise KernelError(f"bias is on {bias.device} but x is on {device}")


def check_mode(mode: str) -> int:
    if mode not in MODES:
        raise KernelError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    return MODES[mode]


def check_path(path: str) -> int:
    if path not in PATHS:
        raise KernelError(f"path must be one of {tuple(PATHS)}, got {path!r}")
    return PATHS[path]


# ------------------------------------------------------------------------------------------ path threshold
def lut_max_rows(mode: str = "fast") -> int:
    """Input rows up to which ``path="auto"`` runs the LUT path in ``mode`` (above: decode + GEMM); process-wide."""
    _configure_default_threshold()
    return int(_lib().qg_biqgemm_lut_max_rows(check_mode(mode)))


def set_lut_max_rows(exact: int | None = None, fast: int | None = None) -> None:
    """Set the LUT/GEMM crossover per mode for this process (e.g. from a target's
    ``cost.biqgemm_lut_max_rows``, measured by ``bench/biqgemm.py --calibrate``); ``None`` leaves one as is."""
    _configure_default_threshold()
    for mode, rows in (("exact", exact), ("fast", fast)):
        if rows is None:
            continue
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise KernelError(f"lut_max_rows for {mode} must be an int >= 0, got {rows!r}")
        _lib().qg_biqgemm_set_lut_max_rows(MODES[mode], rows)


def apply_cost_figures(cost) -> None:
    """Use a target's measured crossover (``Target.cost.biqgemm_lut_max_rows``) for this process."""
    rows = getattr(cost, "biqgemm_lut_max_rows", None) or {}
    set_lut_max_rows(exact=rows.get("exact"), fast=rows.get("fast"))


_threshold_configured = [False]


def _configure_default_threshold() -> None:
    """On first use, take the crossover from ``QGRAPH_BIQGEMM_LUT_MAX_ROWS`` (``"8"`` or ``"exact=4,fast=8"``), else
    the x86-avx2 target's cost figures (x86 hosts), else the library's built-in default."""
    if _threshold_configured[0]:
        return
    _threshold_configured[0] = True
    env = os.environ.get("QGRAPH_BIQGEMM_LUT_MAX_ROWS", "").strip()
    rows: dict[str, int] = {}
    try:
        if env:
            for part in env.split(","):
                key, _, val = part.rpartition("=")
                for mode in (key.strip(),) if key else tuple(MODES):
                    check_mode(mode)
                    rows[mode] = int(val)
        else:
            rows = _host_target_rows()
    except (ValueError, KernelError) as e:
        raise KernelError(f"QGRAPH_BIQGEMM_LUT_MAX_ROWS={env!r} is not an int or 'exact=N,fast=M': {e}") from None
    for mode, n in rows.items():
        _lib().qg_biqgemm_set_lut_max_rows(MODES[mode], max(0, int(n)))


def _host_target_rows() -> dict[str, int]:
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    try:
        from qgraph.target import load_target

        return dict(getattr(load_target("x86-avx2").cost, "biqgemm_lut_max_rows", None) or {})
    except Exception:  # a missing or broken target file: keep the library's defaults
        return {}


# ------------------------------------------------------------------------------------------ kernel
def biqgemm_cpu(
    x: torch.Tensor,
    packed: torch.Tensor,
    alpha: torch.Tensor,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
    group_size: int,
    mode: str = "exact",
    path: str = "auto",
) -> torch.Tensor:
    """``y = x @ Ŵᵀ + bias`` on ``cpu-lut4`` tensors; validates everything before calling C.

    ``path``: ``"auto"`` (the LUT path up to `lut_max_rows` input rows, decode + GEMM above), ``"lut"`` or
    ``"gemm"`` (tests and benchmarks)."""
    mode_id = check_mode(mode)
    path_id = check_path(path)
    check_activation(x, in_features, "cpu")
    q = check_packed(packed, alpha, offset, out_features, in_features, group_size)
    check_bias(bias, out_features, x.device)
    if "QGRAPH_BIQGEMM_ISA" in os.environ:
        _check_isa_env()
    lib = _lib()
    if not _threshold_configured[0]:
        _configure_default_threshold()
    _sync_threads()
    x2 = x.reshape(-1, in_features)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.to(torch.float32).contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    n = x2.shape[0]
    y = torch.empty((n, out_features), dtype=torch.float32)
    if n:
        rc = lib.qg_biqgemm_f32_path(
            x2.data_ptr(), n, in_features, packed.data_ptr(), alpha.data_ptr(),
            None if offset is None else offset.data_ptr(), None if bias is None else bias.data_ptr(),
            out_features, q, group_size, mode_id | (MODE_KSCALES if alpha.dtype == torch.uint8 else 0), path_id,
            y.data_ptr(),
        )
        if rc != 0:
            raise KernelError(f"BiQGEMM CPU kernel failed with code {rc} (n={n}, {out_features}x{in_features}, q={q})")
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], out_features)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def biqgemm(x: torch.Tensor, w: CpuPackedWeight, bias: torch.Tensor | None = None, mode: str = "exact",
            path: str = "auto"):
    """Run the CPU kernel on a `CpuPackedWeight` through ctypes (no torch.library dispatch)."""
    m, k = w.shape
    return biqgemm_cpu(x, w.packed, w.alpha, w.offset, bias, m, k, w.group_size, mode, path)


def gemm_buffers(n: int, w: CpuPackedWeight, mode: str = "fast") -> dict[str, int]:
    """Bytes the GEMM path of an ``n``-row call on ``w`` works in (kept by the kernel for later calls): the decoded
    weight chunk per thread (never more than one 32-row tile chunk, <= 256 KiB), the activation panels (a copy of
    at most 256 rows of x, shared) and the accumulators per thread; and the threads it uses."""
    out = (ctypes.c_int64 * 4)()
    m, k = w.shape
    _sync_threads()
    rc = _lib().qg_biqgemm_gemm_buffers(n, m, k, w.bits, w.group_size, check_mode(mode), out)
    if rc != 0:
        raise KernelError(f"gemm_buffers: invalid arguments (n={n}, {m}x{k})")
    return {"weight_tile_bytes_per_thread": out[0], "activation_bytes": out[1], "accumulator_bytes_per_thread": out[2],
            "threads": out[3]}


def gemm_fast_is_int8() -> bool:
    """Whether fast mode's GEMM path runs int8 on this CPU and ISA path (AVX-512 VNNI); else it is exact fp32."""
    _check_isa_env()
    return bool(_lib().qg_biqgemm_gemm_int8(MODES["fast"]))


def fast_error_bound(x: torch.Tensor, w: BCQWeight, path: str = "lut") -> torch.Tensor:
    """Elementwise worst-case ``|y_fast − y_exact|`` of ``mode="fast"`` on ``path`` (``"lut"`` or ``"gemm"``);
    float32 ``[..., M]``.

    - LUT path: ``Σ_b 4·s_b·Σ_i |α_{i,g(b)}|`` with ``s_b = max_{chunk c in block b} Σ_{k∈c} |x_k| / 127``.
    - GEMM path (int8, see the module docstring): ``Σ_seg e_w·Σ_{k∈seg}|x_k| + (s_x/2)·Σ_{k∈seg}|ŵ_k| +
      e_w·(s_x/2)·|seg|`` with ``e_w = s_w·(1/2 + (q+2)/512)``, ``s_w = (|z| + Σ_i|α_i|)/127`` of the row and
      group, ``s_x = max_{k∈seg}|x_k|/127``. Where that path is exact fp32 (no AVX-512 VNNI) the bound is 0.
    """
    check_path(path)
    if path == "gemm":
        return _gemm_int8_error_bound(x, w) if gemm_fast_is_int8() else torch.zeros(*x.shape[:-1], w.shape[0])
    m, k = w.shape
    geo = Geometry(m, k, w.group_size)
    x2 = x.detach().reshape(-1, k).to(torch.float32).abs().cpu()
    xp = torch.zeros(x2.shape[0], geo.blocks * BLOCK_K)
    xp[:, _real_columns(geo)] = x2
    s = xp.reshape(x2.shape[0], geo.blocks, 8, 4).sum(-1).amax(-1) / 127.0  # [N, NB]
    a = w.alpha.detach().abs().sum(0).cpu()  # [M, G]
    bpg = geo.group_padded // BLOCK_K
    s_g = s.reshape(x2.shape[0], geo.groups, bpg).sum(-1)  # Σ_b s_b per group
    bound = 4.0 * s_g @ a.t()
    return bound.reshape(*x.shape[:-1], m)


def _gemm_int8_error_bound(x: torch.Tensor, w: BCQWeight) -> torch.Tensor:
    m, k = w.shape
    geo = Geometry(m, k, w.group_size)
    cols = _real_columns(geo)
    seg = geo.segment_blocks * BLOCK_K
    nseg = geo.blocks * BLOCK_K // seg
    x2 = x.detach().reshape(-1, k).to(torch.float32).abs().cpu()
    xp = torch.zeros(x2.shape[0], nseg * seg)
    xp[:, cols] = x2
    xseg = xp.reshape(-1, nseg, seg)
    sx_half = xseg.amax(-1) / 127.0 / 2  # [N, nseg]
    xabs = xseg.sum(-1)
    wd = w.dequantize().detach().float().abs().cpu()
    wp = torch.zeros(m, nseg * seg)
    wp[:, cols] = wd
    wabs = wp.reshape(m, nseg, seg).sum(-1)  # [M, nseg]
    a = w.alpha.detach().float().abs().sum(0).cpu()  # [M, G]
    if w.offset is not None:
        a = a + w.offset.detach().float().abs().cpu()
    e_w = a / 127.0 * (0.5 + (w.bits + 2) / 512.0)
    seg_group = torch.arange(nseg) * seg // geo.group_padded
    e = e_w[:, seg_group]  # [M, nseg]
    cnt = torch.zeros(nseg * seg)
    cnt[cols] = 1.0
    cnt = cnt.reshape(nseg, seg).sum(-1)
    bound = xabs @ e.t() + sx_half @ wabs.t() + (sx_half * cnt) @ e.t()
    return bound.reshape(*x.shape[:-1], m)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|y − ref| / max|ref|`` (the relative error every kernel test and the bench report)."""
    den = ref.detach().float().abs().max().item()
    num = (y.detach().float() - ref.detach().float()).abs().max().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)
