"""Triton BiQGEMM for CUDA: layout ``"cuda-lut8"``, its packing, the kernels and the launcher.

Layout ``cuda-lut8`` (built by `pack_cuda` from a `BCQWeight` of shape ``(M, K)``, ``KW = ceil(K/32)``):
- ``packed``: int32 ``[KW, q, M]``; bit ``b`` (LSB first) of word ``[w, i, m]`` is 1 where
  ``B_i[m, 32w + b] = +1``. The words are the uint32 words of LUT-GEMM stored bit-identically as int32
  (torch has few uint32 ops); M is innermost so a warp loads 32 rows' words of one plane in one transaction.
  Byte ``c`` of a word is the μ=8 key of activations ``32w + 8c .. 32w + 8c + 7``. Padding bits are 0.
- ``alpha``: ``[G, q, M]``; ``offset``: ``[G, M]`` or None (``G = ceil(K / group_size)``). Both float32 in
  layout ``cuda-lut8`` (the weight exactly as quantized) or both float16 in layout ``cuda-lut8-h`` (LUT-GEMM's
  storage: α and z rounded to fp16, which cuts the bytes a GEMV moves by 12.5% at q=3, group 128 — 0.4375
  against 0.5 bytes per weight, so its bandwidth ceiling against fp16 weights rises from 4.0x to 4.57x; without
  an offset 4.74x against 4.27x). Both layouts share one kernel: Triton specializes it on the scale pointers'
  dtype and scales are widened to fp32 as they load.
Group sizes: the whole row, or a multiple of 32 (so a 32-wide word never straddles two groups).

Kernels (fp32 accumulation always; output in x's dtype):
- batch ≤ 8, ``algo="lut"`` (the default there) — the LUT algorithm proper: per word and batch row, the four
  μ=8 tables of the 256 signed sums ``T[key] = Σ_s ±x_s`` are built in registers as
  ``T_hi[key >> 4] + T_lo[key & 15]`` (two 16-entry half tables from broadcasting key bits against x, then
  one broadcast add), and every bit-plane's 8-bit keys gather from them with ``tl.gather``. The table is kept
  rank-1 on purpose: Triton lowers a rank-1 gather through shared memory (one ``LDS`` per key, as in
  LUT-GEMM), while a rank-2+ gather is rewritten into warp shuffles costing one per table entry a lane holds
  (measured: 1161 shuffles and 236 registers per word at 32 rows, against 56 registers and 18 ``LDS``).
  A program's lanes are (plane, row) pairs, ``lane = plane·ROWS + row`` with ``ROWS = LANES // q``: each lane
  accumulates α-scaled sums for its plane, ``z·Σx`` rides on the plane-0 lanes, and the q planes of a row are
  summed once, after the K loop. So q=3 spends no lane on a padding plane (an earlier [4, BLOCK_M] tile did, and
  summed planes every word): sm_90 SASS of the inner loop fell from 48.3 to 35.9 warp instructions per 1000
  (row·column·plane) at batch 1, q=3, fp16 (0.74x; 0.72x with an offset, 0.74x at batch 2 and 8), and stayed
  within 0.92-1.03x for q=2 and 4. The cost is registers at batch 4-8, where the accumulator is per lane
  (batch 8, q=3: 128 -> 169 per thread, no spills), so fewer warps fit an SM; ``--tune`` on a GPU decides.
- batch ≤ 8, ``algo="decode"``: same semantics without tables — each word's bits are decoded in registers
  (shift/mask → ±α), summed over planes into 32 columns of Ŵ and multiply-added with x (a bit-serial
  dequant-in-registers GEMV). Kept as the plain alternative the brief allows; sm_90 SASS of the inner loop
  has 5-8x more warp instructions per (row·column·plane) than the LUT path (with an offset at batch 1: 217 vs
  40 per 1000 at q=4, 289 vs 38 at q=3), so it is not the default. ``bench/biqgemm_cuda.py`` times both.
- batch > 8, ``algo="dot"``: bit-planes are dequantized tile by tile into x's dtype (fp32 for fp32 input,
  where ``mode="exact"`` keeps IEEE fp32 products and ``mode="fast"`` allows TF32) and fed to ``tl.dot``
  (tensor cores). Its dequantization costs ~122 warp instructions per 1000 (row·column·plane) whatever the
  batch, so by instruction count alone it overtakes the LUT path somewhere between batch 4 and 8;
  `AUTO_LUT_MAX_BATCH` keeps the design's 8 until H100 timings say otherwise.
All three split K across programs when rows alone cannot fill the GPU. Splits reduce inside the same launch:
each program stores its fp32 partial tile to a workspace and bumps the tile's counter (release/acquire at GPU
scope); the program that sees the count complete sums the partials in split order, adds the bias, writes y in
x's dtype and re-zeroes the counter. So a call is one kernel launch whatever the split (the earlier fp32-atomic
scheme took three: zero-fill, kernel, cast), and the result is deterministic.
Under ``TRITON_INTERPRET=1`` (set before triton is first imported) the kernels run on CPU tensors, which is
how they are tested without a GPU.
"""
from __future__ import annotations

import math
from functools import cache

import torch

from qgraph.errors import KernelError
from qgraph.quant.bcq_weight import BCQWeight

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # triton is the optional "gpu" extra
    HAS_TRITON = False

LAYOUT = "cuda-lut8"
LAYOUT_HALF_SCALES = "cuda-lut8-h"
MAX_LUT_BATCH = 8  # the lut/decode kernels take at most this many rows of x
AUTO_LUT_MAX_BATCH = 8  # algo="auto" uses lut up to here, dot above
WORD_BITS = 32
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SCALE_DTYPES = (torch.float32, torch.float16)


def words_per_group(group_size: int, in_features: int) -> int:
    """Words (32 columns) per α group; raises `KernelError` for group sizes this layout cannot take."""
    kw = -(-in_features // WORD_BITS)
    if group_size >= in_features:
        return kw
    if group_size < WORD_BITS or group_size % WORD_BITS:
        raise KernelError(
            f"cuda-lut8 needs group_size = in_features ({in_features}) or a multiple of 32, got {group_size}; "
            "re-quantize with such a group size or use layout 'planes'/'cpu-lut4'"
        )
    return group_size // WORD_BITS


def pack_cuda(
    w: BCQWeight, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Repack a `BCQWeight` into the ``cuda-lut8`` layout on w's device: ``(packed, alpha, offset)``.

    ``scale_dtype=torch.float16`` stores α and z rounded to fp16 (layout ``cuda-lut8-h``); it raises
    `KernelError` where a scale does not fit fp16's range.
    """
    if scale_dtype not in _SCALE_DTYPES:
        raise KernelError(f"cuda-lut8 stores scales as float32 or float16, got {scale_dtype}")
    m, k = w.shape
    words_per_group(w.group_size, k)
    q = w.bits
    kw = -(-k // WORD_BITS)
    planes = w.planes
    pad = kw * 4 - planes.shape[-1]
    if pad:
        planes = torch.nn.functional.pad(planes, (0, pad))
    # Little-endian bytes → uint32 words: byte c lands in bits 8c..8c+7, preserving LSB-first bit order.
    le = torch.tensor([1, 1 << 8, 1 << 16, 1 << 24], dtype=torch.int64, device=planes.device)
    words = (planes.reshape(q, m, kw, 4).to(torch.int64) * le).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    packed = words.permute(2, 0, 1).contiguous()
    alpha = _to_scale_dtype(w.alpha.permute(2, 0, 1), "alpha", scale_dtype)
    offset = None if w.offset is None else _to_scale_dtype(w.offset.t(), "offset", scale_dtype)
    return packed, alpha, offset


def _to_scale_dtype(t: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    out = t.to(dtype).contiguous()
    if dtype != t.dtype and not torch.isfinite(out).all():
        worst = t.abs().max().item()
        raise KernelError(f"{name} has |values| up to {worst:.3g}, beyond {dtype}'s range; use layout 'cuda-lut8' "
                          "(float32 scales) for this weight")
    return out


# --------------------------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @triton.jit
    def _write_out(out_ptr, acc, bias_ptr, offs_b, offs_m, mask, mask_m, stride_on, HAS_BIAS: tl.constexpr):
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)[None, :]
        ptrs = out_ptr + offs_b[:, None] * stride_on + offs_m[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _store_out(out_ptr, acc, bias_ptr, offs_b, offs_m, mask_b, mask_m, stride_on, ws_ptr, cnt_ptr, tile, pid_k,
                   n_split, N, M, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
        """Write one tile; with SPLIT, the last of its ``n_split`` K-programs to finish sums all partials."""
        mask = mask_b[:, None] & mask_m[None, :]
        if SPLIT:
            part = offs_b[:, None] * M + offs_m[None, :]
            tl.store(ws_ptr + pid_k * N * M + part, acc, mask=mask)
            tl.debug_barrier()  # every thread's partial is written before the release below
            done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if done == n_split - 1:
                total = tl.zeros_like(acc)
                for s in range(n_split):  # fixed order: the result does not depend on which program was last
                    total += tl.load(ws_ptr + s * N * M + part, mask=mask, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")  # the counters stay zeroed for the next call
                _write_out(out_ptr, total, bias_ptr, offs_b, offs_m, mask, mask_m, stride_on, HAS_BIAS)
        else:
            _write_out(out_ptr, acc, bias_ptr, offs_b, offs_m, mask, mask_m, stride_on, HAS_BIAS)

    @triton.jit
    def _lut_kernel(
        x_ptr, packed_ptr, alpha_ptr, offset_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
        N, M, K, KW, WPG, WORDS_PER_SPLIT, stride_xn, stride_on,
        Q: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_B: tl.constexpr, LANES: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # Lane e holds plane e // ROWS of row e % ROWS (ROWS = LANES // Q), so no lane is spent on a padding plane
        # when q is not a power of two; the planes of a row are summed once, after the K loop.
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        m0 = pid_m * ROWS
        offs_e = tl.arange(0, LANES)
        plane = offs_e // ROWS
        row = m0 + offs_e % ROWS
        mask_e = (plane < Q) & (row < M)
        e_off = plane * M + row  # into a [q, M] slab
        offs_b = tl.arange(0, BLOCK_B)
        mask_b = offs_b < N
        x_row = x_ptr + offs_b * stride_xn

        c4 = tl.arange(0, 4)  # the 4 μ=8 chunks of a word
        s4 = tl.arange(0, 4)
        e16 = tl.arange(0, 16)
        # S[e, s] = ±1: the sign of x_s in half-table entry e
        sgn = (((e16[:, None] >> s4[None, :]) & 1) * 2 - 1).to(tl.float32)
        xoff = c4[:, None] * 8 + s4[None, :]  # [4, 4] column of (chunk, bit) inside a word
        chunk = (c4[:, None] * 256).broadcast_to((4, LANES))
        shift = (c4[:, None] * 8).broadcast_to((4, LANES))
        base = (offs_b * 1024)[:, None, None]

        acc = tl.zeros((BLOCK_B, LANES), dtype=tl.float32)
        w_start = pid_k * WORDS_PER_SPLIT
        w_end = tl.minimum(w_start + WORDS_PER_SPLIT, KW)
        for g in range(w_start // WPG, (w_end - 1) // WPG + 1):
            a = tl.load(alpha_ptr + g * Q * M + e_off, mask=mask_e, other=0.0).to(tl.float32)  # [LANES]
            if HAS_OFFSET:  # z rides on the plane-0 lanes
                z = tl.load(offset_ptr + g * M + row, mask=mask_e & (plane == 0), other=0.0).to(tl.float32)
            sx = tl.zeros((BLOCK_B,), dtype=tl.float32)
            for w in range(tl.maximum(w_start, g * WPG), tl.minimum(w_end, (g + 1) * WPG)):
                words = tl.load(packed_ptr + w * Q * M + e_off, mask=mask_e, other=0)  # [LANES]
                lo_c = w * 32 + xoff
                hi_c = lo_c + 4
                x_lo = tl.load(x_row[:, None, None] + lo_c[None, :, :],
                               mask=mask_b[:, None, None] & (lo_c < K)[None, :, :], other=0.0)
                x_hi = tl.load(x_row[:, None, None] + hi_c[None, :, :],
                               mask=mask_b[:, None, None] & (hi_c < K)[None, :, :], other=0.0)
                x_lo = x_lo.to(tl.float32)  # [BLOCK_B, 4 chunks, 4 bits]
                x_hi = x_hi.to(tl.float32)
                t_lo = tl.sum(x_lo[:, :, None, :] * sgn[None, None, :, :], axis=3)  # [B, 4, 16]
                t_hi = tl.sum(x_hi[:, :, None, :] * sgn[None, None, :, :], axis=3)
                # 1-D on purpose: Triton lowers a rank-1 gather through shared memory (one load per key);
                # higher ranks become warp shuffles costing one per table entry held by a lane.
                table = tl.reshape(t_hi[:, :, :, None] + t_lo[:, :, None, :], (BLOCK_B * 1024,))
                keys = ((words[None, :] >> shift) & 255) + chunk  # [4, LANES]
                idx = tl.reshape(keys[None, :, :] + base, (BLOCK_B * 4 * LANES,))
                hit = tl.reshape(tl.gather(table, idx, 0), (BLOCK_B, 4, LANES))
                acc += tl.sum(hit, axis=1) * a[None, :]  # Σ_k x_k B_i[m, k] over the word, times α
                if HAS_OFFSET:
                    sx += tl.sum(tl.sum(x_lo + x_hi, axis=2), axis=1)
            if HAS_OFFSET:
                acc += sx[:, None] * z[None, :]
        # y[b, r] = Σ_i acc[b, i·ROWS + r]
        offs_r = tl.arange(0, BLOCK_R)
        flat = tl.reshape(acc, (BLOCK_B * LANES,))
        y = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
        for i in tl.static_range(Q):
            src = tl.where(offs_r < ROWS, i * ROWS + offs_r, 0)[None, :] + (offs_b * LANES)[:, None]
            y += tl.reshape(tl.gather(flat, tl.reshape(src, (BLOCK_B * BLOCK_R,)), 0), (BLOCK_B, BLOCK_R))
        offs_m = m0 + offs_r
        mask_m = (offs_r < ROWS) & (offs_m < M)
        _store_out(out_ptr, y, bias_ptr, offs_b, offs_m, mask_b, mask_m, stride_on, ws_ptr, cnt_ptr, pid_m, pid_k,
                   tl.num_programs(1), N, M, HAS_BIAS, SPLIT)

    @triton.jit
    def _decode_kernel(
        x_ptr, packed_ptr, alpha_ptr, offset_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
        N, M, K, Q, KW, WPG, WORDS_PER_SPLIT, stride_xn, stride_on,
        HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, QP: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_b = tl.arange(0, BLOCK_B)
        offs_q = tl.arange(0, QP)
        mask_m = offs_m < M
        mask_b = offs_b < N
        mask_qm = (offs_q[:, None] < Q) & mask_m[None, :]
        qm_off = offs_q[:, None] * M + offs_m[None, :]  # [QP, BLOCK_M] into a [q, M] slab
        x_row = x_ptr + offs_b * stride_xn
        cols = tl.arange(0, 32)

        acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
        w_start = pid_k * WORDS_PER_SPLIT
        w_end = tl.minimum(w_start + WORDS_PER_SPLIT, KW)
        for g in range(w_start // WPG, (w_end - 1) // WPG + 1):
            a = tl.load(alpha_ptr + g * Q * M + qm_off, mask=mask_qm, other=0.0).to(tl.float32)  # [QP, BLOCK_M]
            if HAS_OFFSET:
                z = tl.load(offset_ptr + g * M + offs_m, mask=mask_m, other=0.0).to(tl.float32)
            for w in range(tl.maximum(w_start, g * WPG), tl.minimum(w_end, (g + 1) * WPG)):
                words = tl.load(packed_ptr + w * Q * M + qm_off, mask=mask_qm, other=0)  # [QP, BLOCK_M]
                kcol = w * 32 + cols
                xw = tl.load(x_row[:, None] + kcol[None, :],
                             mask=mask_b[:, None] & (kcol < K)[None, :], other=0.0).to(tl.float32)
                bits = (words[:, :, None] >> cols[None, None, :]) & 1  # [QP, BLOCK_M, 32]
                wt = tl.sum(tl.where(bits != 0, a[:, :, None], -a[:, :, None]), axis=0)  # [BLOCK_M, 32]
                if HAS_OFFSET:
                    wt += z[:, None]
                acc += tl.sum(xw[:, None, :] * wt[None, :, :], axis=2)
        _store_out(out_ptr, acc, bias_ptr, offs_b, offs_m, mask_b, mask_m, stride_on, ws_ptr, cnt_ptr, pid_m, pid_k,
                   tl.num_programs(1), N, M, HAS_BIAS, SPLIT)

    @triton.jit
    def _gemm_kernel(
        x_ptr, packed_ptr, alpha_ptr, offset_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
        N, M, K, Q, KW, WPG, TILES_PER_SPLIT, stride_xn, stride_on,
        HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
        UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        WT: tl.constexpr = BLOCK_K // 32
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_b = offs_b < N
        mask_m = offs_m < M
        offs_w = tl.arange(0, WT)
        acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
        n_tiles = tl.cdiv(KW, WT)
        t_start = pid_k * TILES_PER_SPLIT
        for t in range(t_start, tl.minimum(t_start + TILES_PER_SPLIT, n_tiles)):
            ws = t * WT + offs_w  # [WT] word indices of this K tile
            mask_wm = (ws < KW)[:, None] & mask_m[None, :]
            grp = ws // WPG
            offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_b[:, None] * stride_xn + offs_k[None, :],
                        mask=mask_b[:, None] & (offs_k < K)[None, :], other=0.0)
            wtile = tl.zeros((WT, 32, BLOCK_M), dtype=tl.float32)
            for i in range(Q):
                words = tl.load(packed_ptr + (ws[:, None] * Q + i) * M + offs_m[None, :], mask=mask_wm, other=0)
                a = tl.load(alpha_ptr + (grp[:, None] * Q + i) * M + offs_m[None, :], mask=mask_wm,
                            other=0.0).to(tl.float32)
                bits = (words[:, None, :] >> tl.arange(0, 32)[None, :, None]) & 1  # [WT, 32, BLOCK_M]
                wtile += tl.where(bits != 0, a[:, None, :], -a[:, None, :])
            if HAS_OFFSET:
                z = tl.load(offset_ptr + grp[:, None] * M + offs_m[None, :], mask=mask_wm, other=0.0).to(tl.float32)
                wtile += z[:, None, :]
            wk = tl.reshape(wtile, (BLOCK_K, BLOCK_M)).to(x.dtype)
            if UPCAST:  # bf16 products are exact in fp32: same numbers, for the interpreter's bf16 dot bug
                acc += tl.dot(x.to(tl.float32), wk.to(tl.float32), input_precision="ieee")
            elif IEEE:
                acc += tl.dot(x, wk, input_precision="ieee")
            else:
                acc += tl.dot(x, wk)
        _store_out(out_ptr, acc, bias_ptr, offs_b, offs_m, mask_b, mask_m, stride_on, ws_ptr, cnt_ptr,
                   pid_b * tl.num_programs(1) + pid_m, pid_k, tl.num_programs(2), N, M, HAS_BIAS, SPLIT)


# --------------------------------------------------------------------------------------------- launcher
def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _interpreting() -> bool:
    return HAS_TRITON and not isinstance(_lut_kernel, triton.runtime.JITFunction)


def _pick_split(programs: int, units: int, device: torch.device) -> int:
    """Split K so rows × splits reach about four waves of programs (1 in the interpreter)."""
    if device.type != "cuda" or units <= 1:
        return 1
    target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(units, math.ceil(target / programs), 64))


def _check(x, packed, alpha, offset, bias, out_features, in_features, group_size) -> tuple[int, int]:
    m, k = out_features, in_features
    kw = -(-k // WORD_BITS)
    wpg = words_per_group(group_size, k)
    g = -(-k // group_size)
    if x.dtype not in _FLOAT_DTYPES:
        raise KernelError(f"biqgemm_triton takes fp16/bf16/fp32 activations, got {x.dtype}; cast x first")
    if x.shape[-1] != k:
        raise KernelError(f"x has {x.shape[-1]} features but the weight expects in_features={k}")
    if packed.dim() != 3 or packed.dtype != torch.int32 or packed.shape[0] != kw or packed.shape[2] != m:
        raise KernelError(
            f"packed must be int32 [{kw}, q, {m}] (layout cuda-lut8 from pack_cuda), "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    q = packed.shape[1]
    if not 1 <= q <= 8:
        raise KernelError(f"cuda-lut8 supports 1..8 bit-planes, got {q}")
    if alpha.dtype not in _SCALE_DTYPES or tuple(alpha.shape) != (g, q, m):
        raise KernelError(f"alpha must be float32 or float16 [{g}, {q}, {m}], got {alpha.dtype} {tuple(alpha.shape)}")
    if offset is not None and (offset.dtype != alpha.dtype or tuple(offset.shape) != (g, m)):
        raise KernelError(
            f"offset must be {alpha.dtype} (alpha's dtype) [{g}, {m}] or None, got {offset.dtype} {tuple(offset.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (m,):
        raise KernelError(f"bias must have shape ({m},), got {tuple(bias.shape)}")
    tensors = [t for t in (x, packed, alpha, offset, bias) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise KernelError("biqgemm_triton: x, packed, alpha, offset and bias must be on one device")
    if x.device.type != "cuda" and not _interpreting():
        raise KernelError(
            f"biqgemm_triton runs on CUDA tensors (got {x.device}); move the model to a GPU, or set "
            "TRITON_INTERPRET=1 before importing qgraph to run the kernels slowly on CPU"
        )
    return q, wpg


def biqgemm_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    alpha: torch.Tensor,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
    group_size: int,
    mode: str = "exact",
    algo: str = "auto",
    split_k: int | None = None,
    block_m: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """``y = x @ Ŵᵀ + bias`` for a ``cuda-lut8`` weight; x is ``[..., K]``, y is ``[..., M]`` in x's dtype.

    ``algo``: ``"auto"`` (lut for ≤ `AUTO_LUT_MAX_BATCH` rows of x, dot above), ``"lut"``, ``"decode"``
    (both ≤ 8 rows) or ``"dot"`` (any number of rows).
    ``mode``: ``"exact"`` or ``"fast"`` (fast only lets fp32 inputs use TF32 in the ``dot`` path).
    ``split_k``, ``block_m`` and ``num_warps`` override the heuristics (tests use split_k to cover the split
    reduction; ``bench/biqgemm_cuda.py --tune`` sweeps all three). ``block_m`` must be a power of two ≥ 16;
    the lut kernel runs ``block_m·next_pow2(q)`` lanes, i.e. ``block_m·next_pow2(q) // q`` rows per program.
    """
    if not HAS_TRITON:
        raise KernelError("biqgemm_triton needs triton: pip install 'qgraph[gpu]'")
    if mode not in ("exact", "fast"):
        raise KernelError(f"mode must be 'exact' or 'fast', got {mode!r}")
    if algo not in ("auto", "lut", "decode", "dot"):
        raise KernelError(f"algo must be one of auto, lut, decode, dot; got {algo!r}")
    if block_m is not None and (block_m < 16 or block_m & (block_m - 1)):
        raise KernelError(f"block_m must be a power of two >= 16, got {block_m}")
    if num_warps is not None and num_warps not in (1, 2, 4, 8, 16):
        raise KernelError(f"num_warps must be 1, 2, 4, 8 or 16, got {num_warps}")
    q, wpg = _check(x, packed, alpha, offset, bias, out_features, in_features, group_size)
    m, k = out_features, in_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n = x2.shape[0]
    if n == 0 or m == 0:
        return x.new_zeros((*lead, m))
    if algo == "auto":
        algo = "lut" if n <= AUTO_LUT_MAX_BATCH else "dot"
    if algo in ("lut", "decode") and n > MAX_LUT_BATCH:
        raise KernelError(f"algo={algo!r} takes at most {MAX_LUT_BATCH} rows of x, got {n}; use 'dot'")
    kw = packed.shape[0]
    dummy = packed  # stands in for absent optional pointers; never read
    common = {"HAS_OFFSET": offset is not None, "HAS_BIAS": bias is not None}

    def tile(default_m: int, default_warps: int) -> tuple[int, int]:
        return block_m or min(default_m, max(16, _next_pow2(m))), num_warps or default_warps

    if algo == "dot":
        block_b, bm, block_k, warps = _dot_config(n, x.dtype, mode)
        bm, warps = tile(bm, warps)
        grid_bm = triton.cdiv(n, block_b) * triton.cdiv(m, bm)
        n_tiles = triton.cdiv(kw, block_k // WORD_BITS)
        split = split_k or _pick_split(grid_bm, n_tiles, x.device)
        per = triton.cdiv(n_tiles, split)
        split = triton.cdiv(n_tiles, per)
        grid = (triton.cdiv(n, block_b), triton.cdiv(m, bm), split)
        out = torch.empty((n, m), dtype=x.dtype, device=x.device)
        ws, cnt = _split_buffers(split, n, m, grid[0] * grid[1], x.device) if split > 1 else (dummy, dummy)
        _gemm_kernel[grid](
            x2, packed, alpha, offset if offset is not None else dummy, bias if bias is not None else dummy, out,
            ws, cnt, n, m, k, q, kw, wpg, per, x2.stride(0), out.stride(0),
            SPLIT=split > 1, IEEE=x.dtype == torch.float32 and mode == "exact",
            UPCAST=x.dtype == torch.bfloat16 and _interpreting(),
            BLOCK_B=block_b, BLOCK_M=bm, BLOCK_K=block_k, num_warps=warps, enable_fp_fusion=True, **common,
        )
    else:
        block_b = _next_pow2(n)
        qp = _next_pow2(q)
        bm, warps = tile(*_gemv_config(block_b, qp, algo == "lut"))
        rows = bm * qp // q if algo == "lut" else bm  # the lut kernel's bm·qp lanes hold bm·qp // q whole rows
        grid_m = triton.cdiv(m, rows)
        split = split_k or _pick_split(grid_m, kw, x.device)
        per = triton.cdiv(kw, split)
        split = triton.cdiv(kw, per)
        out = torch.empty((n, m), dtype=x.dtype, device=x.device)
        ws, cnt = _split_buffers(split, n, m, grid_m, x.device) if split > 1 else (dummy, dummy)
        args = (x2, packed, alpha, offset if offset is not None else dummy, bias if bias is not None else dummy, out,
                ws, cnt, n, m, k)
        strides = (x2.stride(0), out.stride(0))
        launch = {"SPLIT": split > 1, "BLOCK_B": block_b, "num_warps": warps, "enable_fp_fusion": True, **common}
        if algo == "lut":
            _lut_kernel[(grid_m, split)](*args, kw, wpg, per, *strides, Q=q, LANES=bm * qp, ROWS=rows,
                                         BLOCK_R=_next_pow2(rows), **launch)
        else:
            _decode_kernel[(grid_m, split)](*args, q, kw, wpg, per, *strides, BLOCK_M=bm, QP=qp, **launch)
    return out.reshape(*lead, m)


# Tile configs were chosen from sm_90 builds (ptxas register counts, no spills; see tests/kernels/test_triton.py
# which compiles them for sm_90 without a GPU); timings on a real GPU may move them.
def _gemv_config(block_b: int, qp: int, lut: bool) -> tuple[int, int]:
    """(BLOCK_M, num_warps) for the ≤ 8-row kernels; the lut kernel runs BLOCK_M·qp lanes of (plane, row)."""
    if lut:  # bigger M tiles amortize the table build; shrink only where registers would spill
        return (128 if block_b * qp >= 64 else 256), (4 if block_b * qp <= 4 else 8)
    return max(16, min(128, 256 // max(block_b, qp))), (4 if block_b >= 8 else 8)


def _dot_config(n: int, dtype: torch.dtype, mode: str) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_M, BLOCK_K, num_warps) for the dequantize + tl.dot kernel."""
    if dtype == torch.float32 and mode == "exact":  # IEEE fp32: FMA units, keep tiles small
        return (16 if n <= 16 else 32), 64, 32, 4
    if n <= 16:
        return 16, 64, 64, 4
    if n <= 32:
        return 32, 64, 64, 4
    return 64, 128, 64, 8


_COUNTERS: dict[tuple, torch.Tensor] = {}
_RETIRED_COUNTERS: list[torch.Tensor] = []  # outgrown buffers stay alive: a captured CUDA graph may still use them


def _split_buffers(split: int, n: int, m: int, tiles: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 workspace [split, n, m], int32 tile counters) for a split-K launch.

    The counters are zero between calls (the last program of each tile re-zeroes its own), so they are allocated
    and zeroed once per device and stream and reused, also inside CUDA graphs; a stream has its own so two
    streams never share one.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    cnt = _COUNTERS.get(key)
    if cnt is None or cnt.numel() < tiles:
        if cnt is not None:
            _RETIRED_COUNTERS.append(cnt)
        cnt = _COUNTERS[key] = torch.zeros(max(2 * tiles, 4096), dtype=torch.int32, device=device)
    return torch.empty((split, n, m), dtype=torch.float32, device=device), cnt


def biqgemm_cuda_weight(
    x: torch.Tensor, w: BCQWeight, bias: torch.Tensor | None = None, scale_dtype: torch.dtype = torch.float32, **kw
) -> torch.Tensor:
    """Convenience: pack ``w`` (on x's device, scales in ``scale_dtype``) and run `biqgemm_triton` once."""
    packed, alpha, offset = pack_cuda(w.to(x.device), scale_dtype)
    return biqgemm_triton(x, packed, alpha, offset, bias, w.shape[0], w.shape[1], w.group_size, **kw)


# --------------------------------------------------------------------------------------------- op hook
def unpack_cuda(
    packed: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None, out_features: int, in_features: int,
    group_size: int,
) -> BCQWeight:
    """Inverse of `pack_cuda`: the canonical `BCQWeight` (on the tensors' device; fp16 scales come back as the
    float32 numbers they hold)."""
    m, k = out_features, in_features
    kw = -(-k // WORD_BITS)
    if packed.dtype != torch.int32 or packed.dim() != 3 or packed.shape[0] != kw or packed.shape[2] != m:
        raise KernelError(f"packed must be int32 [{kw}, q, {m}] (layout cuda-lut8), got {packed.dtype} "
                          f"{tuple(packed.shape)}")
    shifts = torch.arange(0, 32, 8, device=packed.device)
    words = packed.permute(1, 2, 0).to(torch.int64) & 0xFFFFFFFF  # [q, M, KW]
    planes = ((words.unsqueeze(-1) >> shifts) & 255).to(torch.uint8).reshape(*words.shape[:2], kw * 4)
    return BCQWeight(
        planes=planes[..., : -(-k // 8)].contiguous(),
        alpha=alpha.permute(1, 2, 0).to(torch.float32).contiguous(),
        offset=None if offset is None else offset.t().to(torch.float32).contiguous(),
        shape=(m, k),
        group_size=group_size,
    )


def _registry_packer(scale_dtype: torch.dtype):
    def pack(w: BCQWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if not HAS_TRITON:
            raise KernelError("layout cuda-lut8 needs triton (pip install 'qgraph[gpu]')")
        return pack_cuda(w, scale_dtype)

    return pack


def register_cuda_impl() -> None:
    """Register layouts ``cuda-lut8`` (fp32 scales) and ``cuda-lut8-h`` (fp16 scales) with
    ``torch.ops.qgraph.biqgemm`` (`qgraph.kernels.op.register_layout`).

    Runs when this module is imported, which ``qgraph.kernels.op.get_layout("cuda-lut8")`` does on first use;
    calling it again is harmless. Packing raises `KernelError` without triton, so `BCQLinear` falls back to
    layout ``planes`` there.
    """
    from qgraph.kernels.op import register_layout

    for name, dtype in ((LAYOUT, torch.float32), (LAYOUT_HALF_SCALES, torch.float16)):
        register_layout(name, biqgemm_triton, pack=_registry_packer(dtype), unpack=unpack_cuda, device="cuda",
                        replace=True)


register_cuda_impl()
