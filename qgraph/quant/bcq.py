"""Binary-coding quantization (BCQ): W ≈ z + Σ_i α_i ∘ B_i with B_i ∈ {−1,+1}, α per row or row-group.

Methods (all vectorized over every row-group at once; rows are processed in chunks to bound memory):
- ``greedy``: ``B_i = sign(r)``, ``α_i = mean|r|`` over the group, ``r -= α_i B_i`` (z = group mean first
  when ``offset``).
- ``alternating``: from greedy, repeat: α (and z) by least squares given B (a ridge of 1e-12 relative
  keeps coinciding bit-planes solvable), then B given α by the nearest of the 2^q level sums (sorted
  levels; their midpoints cut each group's sorted weights, found by binary search). Every step is
  optimal given the other, so the objective never increases; the best iterate is kept anyway.
- ``weighted``: the same with the objective Σ_j m_j (w_j − z − Σ_i α_i b_ij)², importance
  ``m = (|w| / max_group |w|)^e`` (e=0 is ``alternating``), optionally clamped at a per-group quantile,
  or an explicit importance tensor. The α step becomes weighted least squares; the B step is unchanged.
  [Post-training weighted quantization of neural networks for language models]

Internally each element holds a q-bit code c (bit i set ↔ b_i = +1); a group's statistics are, per code,
the importance mass and the importance-weighted sum of its weights, which is all the least-squares step
and the objective need (no ``[q, M, K]`` float tensors are ever built). Runs on CPU (float64 inside);
inputs on other devices are copied, the returned BCQWeight is on CPU.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from qgraph.errors import SpecError
from qgraph.quant.bcq_weight import BCQWeight
from qgraph.quant.qspec import BCQ_METHODS, QSpec
from qgraph.quant.uniform import chunk_parallel

Method = Literal["greedy", "alternating", "weighted"]

_CHUNK_ELEMS = 1 << 19  # elements of W per chunk (float64 work buffers ~4 MiB each)
_RIDGE = 1e-12  # relative ridge on the normal equations: only matters when bit-planes coincide in a group


def bcq_importance(
    w: torch.Tensor, group_size: int | None = None, exp: float = 1.0, clip_quantile: float | None = None
) -> torch.Tensor:
    """Per-element importance ``m = (|w| / max|w|)^exp`` with the max taken per row-group, optionally
    clamped at its per-group ``clip_quantile``; float32 ``[M, K]``."""
    x, valid, m_rows, k, _ = _grouped(w, group_size)
    m = _magnitude_importance(x, valid, exp)
    if clip_quantile is not None:
        m = _clip_at_quantile(m, valid, clip_quantile)
    return m.reshape(m_rows, -1)[:, :k].to(torch.float32)


def quantize_bcq(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    method: Method = "weighted",
    rounds: int = 15,
    importance_exp: float = 1.0,
    importance: torch.Tensor | None = None,
    clip_quantile: float | None = None,
    offset: bool = False,
    history: list[float] | None = None,
) -> BCQWeight:
    """Quantize a matrix ``w [M, K]`` to ``bits`` binary planes.

    ``group_size``: columns per α group (None or >= K: one group per row). ``rounds``: alternating rounds
    (stops early at a fixed point). ``importance_exp`` / ``clip_quantile``: the weighted method's
    magnitude importance (see `bcq_importance`); ``importance`` (``[M, K]``, >= 0) replaces it, e.g. a
    Hessian diagonal. ``offset``: also fit a per-group z. ``history``: if a list is given, the objective
    (importance-weighted for ``weighted``) of the greedy start and of each round's iterate is appended —
    non-increasing by construction; the returned code is the best iterate seen (α-only half steps
    included), so its objective is at most ``min(history)``.

    Chunks of rows run on a thread pool as wide as ``torch.get_num_threads()`` while torch's intra-op
    threading is set to 1 (restored after): the rounds are many small ops, which per-op OpenMP
    fork/join would make latency-bound (and very slow on a busy machine).
    """
    if method not in BCQ_METHODS:
        raise SpecError(f"quantize_bcq: method must be one of {BCQ_METHODS}, got {method!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise SpecError(f"quantize_bcq: bits (number of binary planes) must be an int in 1..8, got {bits!r}")
    if rounds < 0:
        raise SpecError(f"quantize_bcq: rounds must be >= 0, got {rounds}")
    if method != "weighted" and (importance is not None or clip_quantile is not None):
        raise SpecError("quantize_bcq: importance and clip_quantile only apply to method='weighted'")
    if not math.isfinite(importance_exp) or importance_exp < 0:
        raise SpecError(f"quantize_bcq: importance_exp must be a finite float >= 0, got {importance_exp}")
    if clip_quantile is not None and not 0.0 < clip_quantile <= 1.0:
        raise SpecError(f"quantize_bcq: clip_quantile must be in (0, 1], got {clip_quantile}")

    x_all, valid_all, m_rows, k, g = _grouped(w, group_size)
    imp_all = None if importance is None else _grouped_importance(importance, m_rows, k, g)
    n = x_all.shape[0]
    chunk = max(1, _CHUNK_ELEMS // g)
    codes_out = torch.empty((n, g), dtype=torch.uint8)
    alpha_out = torch.empty((n, bits), dtype=torch.float64)
    z_out = torch.zeros(n, dtype=torch.float64) if offset else None

    def run(s: int) -> list[float]:
        x = x_all[s : s + chunk]
        valid = None if valid_all is None else valid_all[s : s + chunk]
        if method == "weighted":
            m = imp_all[s : s + chunk] if imp_all is not None else _magnitude_importance(x, valid, importance_exp)
            if clip_quantile is not None:
                m = _clip_at_quantile(m, valid, clip_quantile)
        else:
            m = torch.ones_like(x) if valid is None else valid.to(torch.float64)
        codes, alpha, z, hist = _fit(x, valid, m, bits, rounds if method != "greedy" else 0, offset)
        codes_out[s : s + chunk] = codes
        alpha_out[s : s + chunk] = alpha
        if z_out is not None:
            z_out[s : s + chunk] = z
        return hist

    with chunk_parallel() as pmap:
        hists = pmap(run, range(0, n, chunk))
        if history is not None:
            history.extend(float(sum(h)) for h in zip(*hists))
        num_groups = n // m_rows
        codes_mk = codes_out.reshape(m_rows, num_groups * g)[:, :k]
        planes = _pack_planes(codes_mk, bits)
    alpha = alpha_out.reshape(m_rows, num_groups, bits).permute(2, 0, 1).to(torch.float32).contiguous()
    z = None if z_out is None else z_out.reshape(m_rows, num_groups).to(torch.float32).contiguous()
    return BCQWeight(planes=planes.contiguous(), alpha=alpha, offset=z, shape=(m_rows, k), group_size=g)


def quantize_bcq_spec(
    w: torch.Tensor,
    spec: QSpec,
    importance: torch.Tensor | None = None,
    history: list[float] | None = None,
) -> BCQWeight:
    """`quantize_bcq` driven by a bcq QSpec. N-d weights are viewed as ``[shape[0], -1]`` (the returned
    BCQWeight has that 2-d shape; reshape its dequantized matrix back yourself)."""
    if spec.scheme != "bcq":
        raise SpecError(f"quantize_bcq_spec got a {spec.scheme!r} spec ({spec}); use uniform.quantize_weight")
    spec.check_tensor(w.shape)
    return quantize_bcq(
        w.reshape(w.shape[0], -1),
        spec.bits,
        group_size=spec.group_size,
        method=spec.bcq_method,
        rounds=spec.bcq_rounds,
        importance_exp=float(spec.importance_exp),
        importance=importance if spec.bcq_method == "weighted" else None,
        clip_quantile=spec.importance_clip_quantile if spec.bcq_method == "weighted" else None,
        offset=spec.bcq_offset,
        history=history,
    )


def bcq_round(
    w: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round the columns of ``w [M, k]`` to the nearest level of fixed per-row codebooks ``z + Σ α_i b_i``
    (``alpha [q, M]``, ``offset [M]``): returns ``(signs int8 [q, M, k], ŵ float32 [M, k])``. The step a
    column-by-column method (GPTQ) needs once α of a group is fixed."""
    if w.dim() != 2 or alpha.dim() != 2 or alpha.shape[1] != w.shape[0]:
        raise SpecError(f"bcq_round needs w [M, k] and alpha [q, M]; got {tuple(w.shape)} and {tuple(alpha.shape)}")
    if offset is not None and tuple(offset.shape) != (w.shape[0],):
        raise SpecError(f"bcq_round: offset must have shape ({w.shape[0]},), got {tuple(offset.shape)}")
    bits = alpha.shape[0]
    coef = alpha.detach().to(torch.float64).T
    if offset is not None:
        coef = torch.cat([coef, offset.detach().to(torch.float64)[:, None]], 1)
    table = _sign_table(bits, offset is not None)
    codes = _nearest(coef, table, w.detach().to(device="cpu", dtype=torch.float64))
    w_hat = _levels(coef, table).gather(1, codes.long()).to(torch.float32)
    signs = torch.stack([((codes >> i) & 1).to(torch.int8) * 2 - 1 for i in range(bits)])
    return signs, w_hat


def bcq_objective(w: torch.Tensor, bq: BCQWeight, importance: torch.Tensor | None = None) -> float:
    """``Σ m (w − Ŵ)²`` (m = 1 when ``importance`` is None), accumulated in float64."""
    if tuple(w.shape) != tuple(bq.shape):
        raise SpecError(f"bcq_objective: w has shape {tuple(w.shape)} but the BCQ weight is {bq.shape}")
    err = (w.detach().to(torch.float64) - bq.dequantize().to(torch.float64)).square()
    if importance is not None:
        err = err * importance.to(torch.float64)
    return float(err.sum())


# --- internals -------------------------------------------------------------------------------------
def _grouped(w: torch.Tensor, group_size: int | None):
    """``w [M, K]`` → float64 ``[M*G, g]`` (zero padded), validity mask (None without padding), M, K, g."""
    if w.dim() != 2:
        raise SpecError(f"BCQ quantizes a matrix [M, K]; got shape {tuple(w.shape)} (reshape to [out, -1])")
    m_rows, k = w.shape
    if m_rows == 0 or k == 0:
        raise SpecError(f"BCQ cannot quantize an empty matrix of shape {tuple(w.shape)}")
    if group_size is not None and (isinstance(group_size, bool) or group_size < 1):
        raise SpecError(f"group_size must be a positive int or None (per row), got {group_size!r}")
    g = k if group_size is None else min(int(group_size), k)
    x = w.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise SpecError("BCQ got a weight with inf/nan values; fix the model weights first")
    num_groups = -(-k // g)
    pad = num_groups * g - k
    valid = None
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
        valid = torch.nn.functional.pad(torch.ones(m_rows, k, dtype=torch.bool), (0, pad))
        valid = valid.reshape(-1, g)
    return x.reshape(-1, g), valid, m_rows, k, g


def _grouped_importance(imp: torch.Tensor, m_rows: int, k: int, g: int) -> torch.Tensor:
    if tuple(imp.shape) != (m_rows, k):
        raise SpecError(f"importance must have the weight's shape {(m_rows, k)}, got {tuple(imp.shape)}")
    imp = imp.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(imp).all() or (imp < 0).any():
        raise SpecError("importance must be finite and >= 0 everywhere")
    pad = (-k) % g
    if pad:
        imp = torch.nn.functional.pad(imp, (0, pad))
    return imp.reshape(-1, g)


def _magnitude_importance(x: torch.Tensor, valid: torch.Tensor | None, exp: float) -> torch.Tensor:
    a = x.abs()
    ratio = a / a.amax(dim=1, keepdim=True).clamp_min(1e-300)
    m = ratio.pow(exp)
    return m if valid is None else m * valid


def _clip_at_quantile(m: torch.Tensor, valid: torch.Tensor | None, q: float) -> torch.Tensor:
    """Clamp each row of ``m`` at its q-quantile over valid entries (linear interpolation)."""
    g = m.shape[1]
    if valid is None:
        srt = m.sort(dim=1).values
        nv = torch.full((m.shape[0],), g, dtype=torch.float64)
    else:
        srt = torch.where(valid, m, torch.full_like(m, -1.0)).sort(dim=1).values
        nv = valid.sum(dim=1).to(torch.float64)
    pos = (g - nv) + q * (nv - 1)
    lo = pos.floor().long().clamp(0, g - 1)
    hi = pos.ceil().long().clamp(0, g - 1)
    frac = (pos - lo).unsqueeze(1)
    qv = srt.gather(1, lo[:, None]) * (1 - frac) + srt.gather(1, hi[:, None]) * frac
    return torch.minimum(m, qv)


def _pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[M, K]`` → BCQWeight planes uint8 ``[q, M, ceil(K/8)]`` (bit i of a code is plane i;
    same layout as `pack_signs`, built with 8 shifts instead of a reduction)."""
    k = codes.shape[1]
    if k % 8:
        codes = torch.nn.functional.pad(codes, (0, 8 - k % 8))
    c = codes.reshape(codes.shape[0], -1, 8)
    planes = []
    for i in range(bits):
        b = (c >> i) & 1
        out = b[..., 0].clone()
        for j in range(1, 8):
            out |= b[..., j] << j
        planes.append(out)
    return torch.stack(planes)


def _sign_table(bits: int, offset: bool) -> torch.Tensor:
    """``[2^q, q (+1)]``: row c holds b_i = ±1 for bit i of code c (and a 1 for the offset column)."""
    c = torch.arange(1 << bits)
    s = ((c[:, None] >> torch.arange(bits)) & 1).to(torch.float64) * 2 - 1
    return torch.cat([s, torch.ones(1 << bits, 1, dtype=torch.float64)], dim=1) if offset else s


def _stats(codes: torch.Tensor, m: torch.Tensor, mx: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group and code: importance mass ``cnt`` and weighted sum ``sx`` of the weights, ``[n, 2^q]``."""
    idx = codes.long()
    cnt = torch.zeros(codes.shape[0], levels, dtype=torch.float64).scatter_add_(1, idx, m)
    sx = torch.zeros(codes.shape[0], levels, dtype=torch.float64).scatter_add_(1, idx, mx)
    return cnt, sx


def _levels(coef: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Level sums ``z + Σ α_i b_i`` of every code, ``[n, 2^q]``; ``coef`` is ``[n, q (+1)]``."""
    return coef @ table.T


def _objective(coef, table, cnt, sx, sxx) -> torch.Tensor:
    lv = _levels(coef, table)
    return (sxx - 2 * (lv * sx).sum(1) + (lv * lv * cnt).sum(1)).clamp_min(0.0)


def _solve(cnt: torch.Tensor, sx: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Weighted least squares for α (and z) given the codes: ``(Σ_c cnt_c s_c s_cᵀ) a = Σ_c sx_c s_c``."""
    p = table.shape[1]
    outer = (table[:, :, None] * table[:, None, :]).reshape(table.shape[0], p * p)
    gram = (cnt @ outer).reshape(-1, p, p)
    rhs = sx @ table
    ridge = (_RIDGE * cnt.sum(1) + 1e-300)[:, None, None] * torch.eye(p, dtype=torch.float64)
    return torch.linalg.solve(gram + ridge, rhs)


def _sorted_mids(coef: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between consecutive sorted levels ``[n, 2^q − 1]`` and the codes in level order."""
    srt, perm = _levels(coef, table).sort(dim=1)
    return ((srt[:, 1:] + srt[:, :-1]) * 0.5).contiguous(), perm


def _nearest(coef: torch.Tensor, table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """For each weight, the code of the nearest level: its rank among the sorted level midpoints
    (2^q − 1 vectorized comparisons beat a batched binary search for q <= 4), mapped back to a code."""
    mids, perm = _sorted_mids(coef, table)
    rank = torch.zeros(x.shape, dtype=torch.uint8)
    for j in range(mids.shape[1]):
        rank += x > mids[:, j : j + 1]
    return perm.gather(1, rank.long()).to(torch.uint8)


def _segment_stats(coef, table, xs, pm, pmx) -> tuple[torch.Tensor, torch.Tensor]:
    """`_stats` of ``_nearest(coef)`` without touching every weight: with each group's weights sorted
    (``xs``) the weights of one level form a contiguous run between two midpoints, found by binary
    search; their mass and weighted sum are differences of the prefix sums ``pm`` / ``pmx``."""
    mids, perm = _sorted_mids(coef, table)
    n, g = xs.shape
    inner = torch.searchsorted(xs.contiguous(), mids, right=True)  # elements <= each midpoint (as _nearest)
    bounds = torch.cat([torch.zeros(n, 1, dtype=inner.dtype), inner, torch.full((n, 1), g, dtype=inner.dtype)], 1)
    cm, cmx = pm.gather(1, bounds), pmx.gather(1, bounds)
    cnt = torch.zeros_like(cm[:, 1:]).scatter_(1, perm, cm[:, 1:] - cm[:, :-1])
    sx = torch.zeros_like(cmx[:, 1:]).scatter_(1, perm, cmx[:, 1:] - cmx[:, :-1])
    return cnt, sx


def _greedy(x: torch.Tensor, valid: torch.Tensor | None, bits: int, offset: bool):
    """Greedy residual binarization (float32 inside); returns codes ``[n, g]`` and coef ``[n, q (+1)]``.

    Tracks |r| and sign(r) instead of r: r − α sign(r) = sign(r) (|r| − α)."""
    n, g = x.shape
    x32 = x.to(torch.float32)
    vf = None if valid is None else valid.to(torch.float32)
    total = torch.full((n,), float(g), dtype=torch.float64) if vf is None else vf.sum(1, dtype=torch.float64)
    total = total.clamp_min(1.0)

    def mean(t: torch.Tensor) -> torch.Tensor:
        return (t if vf is None else t * vf).sum(1, dtype=torch.float64) / total

    z = mean(x32) if offset else None
    r = x32 - z.to(torch.float32)[:, None] if offset else x32
    pos = r >= 0
    ar = r.abs()
    codes = pos.to(torch.uint8)
    alphas = []
    for i in range(bits):
        a = mean(ar)
        alphas.append(a)
        if i + 1 < bits:
            d = ar.sub_(a.to(torch.float32)[:, None])
            pos = torch.where(pos, d >= 0, d <= 0)
            ar = d.abs_()
            codes |= pos.to(torch.uint8) << (i + 1)
    coef = torch.stack(alphas + ([z] if offset else []), dim=1)
    return codes, coef


def _fit(x, valid, m, bits, rounds, offset):
    """Fit one chunk of groups; returns codes (α sorted descending, all α >= 0), α ``[n, q]``, z, history.

    State per group: the coefficients α (+z) and the code assignment, which is either the greedy one or
    the nearest-level assignment of some coefficients (``code_coef``); the rounds only ever touch the
    ``[n, 2^q]`` statistics, the codes are materialized once at the end. A group whose statistics stop
    changing is at a fixed point (its next α step would repeat this one) and leaves the working set.
    """
    levels = 1 << bits
    table = _sign_table(bits, offset)
    mx = m * x
    sxx = (mx * x).sum(1)
    greedy_codes, coef = _greedy(x, valid, bits, offset)
    cnt, sx = _stats(greedy_codes, m, mx, levels)
    obj = _objective(coef, table, cnt, sx, sxx)
    hist = [float(obj.sum())]
    best_obj, best_coef, best_code_coef = obj.clone(), coef.clone(), coef.clone()
    best_greedy = torch.ones(x.shape[0], dtype=torch.bool)

    def keep_best(idx, val, coef, code_coef, greedy: bool) -> None:
        bo = best_obj[idx]
        better = val < bo
        best_obj[idx] = torch.where(better, val, bo)
        best_coef[idx] = torch.where(better[:, None], coef, best_coef[idx])
        best_code_coef[idx] = torch.where(better[:, None], code_coef, best_code_coef[idx])
        best_greedy[idx] = torch.where(better, greedy, best_greedy[idx])

    if rounds:
        xs, order = x.sort(dim=1)
        zero = torch.zeros(x.shape[0], 1, dtype=torch.float64)
        pm = torch.cat([zero, m.gather(1, order).cumsum(1)], 1)
        pmx = torch.cat([zero, mx.gather(1, order).cumsum(1)], 1)
        idx: slice | torch.Tensor = slice(None)  # rows of the working set
        cur_obj = obj.clone()
        cur_code_coef, cur_greedy = coef, True
        for _ in range(rounds):
            coef = _solve(cnt, sx, table)
            keep_best(idx, _objective(coef, table, cnt, sx, sxx), coef, cur_code_coef, cur_greedy)  # α step
            new_cnt, new_sx = _segment_stats(coef, table, xs, pm, pmx)  # B step
            obj = _objective(coef, table, new_cnt, new_sx, sxx)
            keep_best(idx, obj, coef, coef, False)
            cur_obj[idx] = obj
            hist.append(float(cur_obj.sum()))
            moving = (new_cnt != cnt).any(1) | (new_sx != sx).any(1)
            cnt, sx, cur_code_coef, cur_greedy = new_cnt, new_sx, coef, False
            n_moving = int(moving.sum())
            if n_moving == 0:
                hist.extend([hist[-1]] * (rounds + 1 - len(hist)))
                break
            if n_moving <= 0.75 * moving.numel():  # shrink the working set
                keep = moving.nonzero().squeeze(1)
                idx = keep if isinstance(idx, slice) else idx[keep]
                xs, pm, pmx, sxx = xs[keep], pm[keep], pmx[keep], sxx[keep]
                cnt, sx, cur_code_coef = cnt[keep], sx[keep], cur_code_coef[keep]
    if bool(best_greedy.all()):
        codes = greedy_codes
    else:
        codes = torch.where(best_greedy[:, None], greedy_codes, _nearest(best_code_coef, table, x))
    return _canonical(codes, best_coef, bits, offset) + (hist,)


def _canonical(codes, coef, bits, offset):
    """Make every α >= 0 (flip its plane) and sort α descending per group (permute the code bits)."""
    alpha = coef[:, :bits]
    z = coef[:, bits] if offset else None
    neg = alpha < 0
    flip = (neg.to(torch.int64) << torch.arange(bits)).sum(1).to(torch.uint8)
    codes = codes ^ flip[:, None]
    alpha, order = alpha.abs().sort(dim=1, descending=True)
    out = torch.zeros_like(codes)
    for i in range(bits):
        bit = (codes >> order[:, i : i + 1].to(torch.uint8)) & 1
        out |= bit << i
    return out, alpha, z
