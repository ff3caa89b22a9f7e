"""GPTQ / OPTQ: quantize a weight column by column and spread each column's rounding error over the columns
not yet quantized, so that the layer output ``X Wᵀ`` moves as little as possible.

Math (``W [M, K]``: rows are output channels; ``X [N, K]``: calibration inputs of the layer):
- ``H = 2 XᵀX / N`` is the Hessian of the per-row output error ``‖X wᵀ − X ŵᵀ‖² / N``; it is damped,
  ``H += λ I`` with ``λ = damp · mean(diag H)`` (inputs that were always zero get ``H_jj = 1``).
- ``U``: the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = Uᵀ U``). Row ``j`` of ``U`` divided by ``U_jj`` is the
  optimal-brain-surgeon update of columns ``k ≥ j`` once columns ``< j`` are fixed: quantizing column ``j``
  with error ``e = (w_j − ŵ_j) / U_jj`` moves the remaining columns by ``w_k −= e U_jk``.
- Lazy batches: columns go in blocks of ``block``; updates are applied column by column inside the block and
  once per block (``E_block U[block, rest]``) to the rest of ``W``.
- ``act_order``: columns are processed by decreasing ``diag H`` (the most sensitive first) and un-permuted
  at the end.
- Groups: a group's parameters (uniform scale / zero point, or BCQ α and offset) are fitted when its first
  column is reached, on the group's columns as they are *then* (already moved by earlier errors). Groups are
  contiguous in the original column order (the storage layout of `UniformWeight` / `BCQWeight`), with or
  without ``act_order``.

The quantizer is a parameter: a uniform QSpec (``tensor`` / ``channel`` / ``group``, axis 0; optional Lp clip
search per group), a block-scaled uniform QSpec (``scale_bits``: its grid is fitted once, on the whole weight,
before the sweep, since its row scales need every group; `qgraph.quant.block_scaled`) or a BCQ QSpec (per group,
α fitted by `quantize_bcq`, then each column rounded to the nearest level of its row's level set). The result is a
`UniformWeight`, `BlockScaledWeight` or `BCQWeight`, the same kind ``quantize-weights`` produces. Arithmetic is float64 on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from qgraph.errors import CalibrationError, SpecError
from qgraph.pass_base import NON_NEGATIVE, POSITIVE, POSITIVE_INT, optional, validate
from qgraph.quant import block_scaled, uniform
from qgraph.quant.bcq import quantize_bcq, quantize_bcq_spec
from qgraph.quant.bcq_weight import BCQWeight
from qgraph.quant.qspec import QSpec
from qgraph.quant.qtensor import UniformWeight

BCQImportance = Literal["spec", "hessian"]


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ's knobs, validated once: the options of the ``gptq`` pass, and the GPTQ part of ``aespa``'s
    (which subclasses it). ``block`` / ``damp`` / ``act_order`` / ``clip_search`` / ``p`` / ``bcq_importance``: see
    `gptq`; ``sequential``: Hessians from inputs produced by the already-quantized layers (else from the float
    model); ``max_batches``: calibration batches used (None: all)."""

    block: int = 128
    damp: float = 0.01
    act_order: bool = False
    sequential: bool = True
    clip_search: bool = False
    p: float = 2.4
    bcq_importance: BCQImportance = "spec"
    max_batches: int | None = None

    def __post_init__(self):
        validate(self, block=POSITIVE_INT, damp=NON_NEGATIVE, p=POSITIVE, max_batches=optional(POSITIVE_INT))

    def gptq_kwargs(self, spec: QSpec) -> dict:
        """The keyword arguments of `gptq` for a weight quantized with ``spec``."""
        return {"block": self.block, "damp": self.damp, "act_order": self.act_order,
                "clip_search": self.clip_search and spec.scheme == "uniform", "p": self.p,
                "bcq_importance": self.bcq_importance}


class HessianAccumulator:
    """Streaming ``H = 2 XᵀX / N`` over row batches of inputs ``[..., K]`` (K×K memory, float64)."""

    def __init__(self, k: int):
        self.k = int(k)
        self.sum = torch.zeros(self.k, self.k, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.k:
            raise CalibrationError(f"Hessian of a layer with {self.k} inputs got activations of shape {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.k).to(device="cpu", dtype=torch.float32)
        self.sum += (x.T @ x).to(torch.float64)
        self.rows += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.rows == 0:
            raise CalibrationError("no calibration rows reached this layer; give calibration data that runs through it")
        return self.sum * (2.0 / self.rows)


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``2 XᵀX / N`` of inputs ``[..., K]`` (float64)."""
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.value()


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)``: with ``H = 2XᵀX/N`` this is twice the mean squared output error per row
    of inputs, summed over outputs."""
    d = (w.to(torch.float64) - w_hat.to(torch.float64))
    return float(((d @ h.to(torch.float64)) * d).sum())


@dataclass(frozen=True)
class GPTQResult:
    """``qweight``: `UniformWeight` or `BCQWeight`; ``w_hat``: its float32 value ``[M, K]``; ``error``:
    ``output_error(W, Ŵ, H)`` with the undamped H; ``rel_error``: that over ``tr(W H Wᵀ)`` (the output's own
    energy); ``damp``: the damping fraction finally used; ``rtn_kept``: round-to-nearest had the lower output
    error, so it is the result."""

    qweight: UniformWeight | BCQWeight | block_scaled.BlockScaledWeight
    w_hat: torch.Tensor
    error: float
    rel_error: float
    damp: float
    rtn_kept: bool = False


def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    spec: QSpec,
    *,
    block: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    clip_search: bool = False,
    p: float = 2.4,
    bcq_importance: BCQImportance = "spec",
) -> GPTQResult:
    """Quantize ``w [M, K]`` (a Linear weight: ``y = x wᵀ``) under ``spec`` with GPTQ, given the Hessian
    ``h [K, K]`` of its inputs (see `HessianAccumulator`).

    ``block``: lazy-update block width; ``damp``: fraction of the mean Hessian diagonal added to it (raised
    ×10 up to three times if H is still not positive definite); ``act_order``: process columns by decreasing
    ``diag H``; ``clip_search``: uniform only, shrink each group's range by the Lp-optimal ratio (``p``) when
    it is fitted; ``bcq_importance``: BCQ only, ``"spec"`` fits α with the spec's method alone, ``"hessian"``
    weighs each column by its ``H_jj`` in the α fit (times the spec's magnitude importance for ``weighted``).
    BCQ results are never worse than BCQ round-to-nearest on the output error: on a coarse non-uniform grid
    the error feedback can carry columns away from the levels (seen at 3 bits with an offset and act_order,
    1.36x the round-to-nearest error), and then the round-to-nearest weight is kept (``rtn_kept``).
    """
    if w.dim() != 2:
        raise SpecError(f"gptq quantizes a matrix [out, in]; got shape {tuple(w.shape)}")
    m, k = w.shape
    if tuple(h.shape) != (k, k):
        raise SpecError(f"gptq: the Hessian must be [{k}, {k}] for a weight of shape {tuple(w.shape)}, got {tuple(h.shape)}")
    if block < 1 or not damp >= 0:
        raise SpecError(f"gptq needs block >= 1 and damp >= 0; got block={block}, damp={damp}")
    spec.check_tensor(w.shape)
    if spec.scheme == "uniform" and spec.granularity != "tensor" and spec.axis % 2 != 0:
        raise SpecError(f"gptq quantizes rows of [out, in] weights: a uniform spec needs axis 0, got {spec}")
    if clip_search and spec.scheme != "uniform":
        raise SpecError("gptq: clip_search applies to uniform specs; BCQ fits its own scales")
    if bcq_importance not in ("spec", "hessian"):
        raise SpecError(f"gptq: bcq_importance must be 'spec' or 'hessian', got {bcq_importance!r}")

    h64 = h.detach().to(device="cpu", dtype=torch.float64)
    w64 = w.detach().to(device="cpu", dtype=torch.float64)
    hdiag = torch.diagonal(h64).clone()
    if spec.scale_bits is not None:
        if clip_search:
            raise SpecError("gptq: clip_search does not apply to block-scaled specs (scale_bits); their grid is "
                            "fitted once, before the sweep")
        quant = _GridColumns(block_scaled.fit_grid(w64, spec, hdiag), m, k)
    elif spec.scheme == "uniform":
        quant = _UniformColumns(spec, m, k, clip_search, p)
    else:
        quant = _BCQColumns(spec, m, k, bcq_importance)

    perm = torch.argsort(hdiag, descending=True, stable=True) if act_order else torch.arange(k)
    pos_of = torch.empty_like(perm)
    pos_of[perm] = torch.arange(k)
    # many small ops on one layer: OpenMP fork/join costs more than it saves (and stalls on a busy machine)
    with uniform.one_thread():
        u, used_damp = _inverse_cholesky(h64[perm][:, perm], damp)
        _sweep(w64[:, perm].T.contiguous(), u, perm, pos_of, hdiag, quant, block)
        qweight = quant.result()
        w_hat32 = qweight.dequantize().reshape(m, k)
        error = output_error(w64, w_hat32, h64)
        rtn_kept = False
        if spec.scheme == "bcq":
            rtn = round_to_nearest(w, spec)
            rtn_hat = rtn.dequantize().reshape(m, k)
            rtn_err = output_error(w64, rtn_hat, h64)
            rtn_kept = rtn_err < error
            if rtn_kept:
                qweight, w_hat32, error = rtn, rtn_hat, rtn_err
        energy = float(((w64 @ h64) * w64).sum())
    return GPTQResult(qweight, w_hat32, error, error / max(energy, 1e-300), used_damp, rtn_kept)


def _sweep(wt: torch.Tensor, u: torch.Tensor, perm: torch.Tensor, pos_of: torch.Tensor, hdiag: torch.Tensor,
           quant, block: int) -> None:
    """The column-by-column loop on ``wt`` = permuted Wᵀ ``[K, M]`` (a column of W is a contiguous row here)."""
    k = wt.shape[0]
    order = perm.tolist()
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wt[i1:i2].clone()
        e1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order[i1 + i]
            group = quant.group_of(col)
            if not quant.fitted(group):
                cols = quant.group_cols(group)
                quant.fit(group, _current(wt, w1, e1, u, pos_of[cols], i1, i2, i), hdiag[cols])
            wc = w1[i]
            err = (wc - quant.round(col, wc)).div_(u1[i, i])
            e1[i] = err
            w1[i:].addr_(u1[i, i:], err, alpha=-1.0)
        wt[i2:].sub_(u[i1:i2, i2:].T @ e1)


def round_to_nearest(w: torch.Tensor, spec: QSpec) -> UniformWeight | BCQWeight | block_scaled.BlockScaledWeight:
    """Plain round-to-nearest (uniform min/max, the block-scaled grid, or BCQ by the spec's method)."""
    if spec.scale_bits is not None:
        return block_scaled.quantize(w, spec)
    if spec.scheme == "uniform":
        codes, scale, zp = uniform.quantize_weight(w.detach().float(), spec)
        return UniformWeight(codes, scale, zp, spec)
    return quantize_bcq_spec(w.detach().float(), spec)


def rtn_error(w: torch.Tensor, h: torch.Tensor, spec: QSpec) -> float:
    """Output error of plain round-to-nearest: the baseline."""
    return output_error(w, round_to_nearest(w, spec).dequantize().reshape(w.shape), h)


# --- internals -------------------------------------------------------------------------------------
def _inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of the damped ``H⁻¹``; damping grows ×10 (up to 3 times) until H is PD."""
    h = h.clone()
    dead = torch.diagonal(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1.0
    mean_diag = float(torch.diagonal(h).mean())
    for attempt in range(4):
        d = damp * (10 ** attempt) if damp > 0 else (0.0 if attempt == 0 else 1e-6 * 10 ** attempt)
        hd = h + d * mean_diag * torch.eye(h.shape[0], dtype=h.dtype)
        with uniform.one_thread():  # multithreaded LAPACK potri is pathologically slow on a busy machine
            lower, info = torch.linalg.cholesky_ex(hd)
            if int(info) == 0:
                hinv = torch.cholesky_inverse(lower)
                upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
        if int(info) == 0:
            return upper, d
    raise CalibrationError(
        "gptq: the input Hessian is not positive definite even with 1000x the damping; the layer's calibration "
        "inputs are degenerate (give more calibration data, or raise damp)"
    )


def _current(wt, w1, e1, u, positions, i1, i2, i):
    """Current values ``[M, n]`` of the columns at processing ``positions`` (none quantized yet), while inside
    block ``[i1, i2)`` after ``i`` of its columns (all in the transposed layout of `_sweep`): in-block columns
    are up to date in ``w1``; later ones still miss the block's pending update ``U[i1:i1+i, pos]ᵀ E_block``."""
    vals = wt[positions].clone()
    inside = (positions >= i1) & (positions < i2)
    if bool(inside.any()):
        vals[inside] = w1[positions[inside] - i1]
    later = positions >= i2
    if bool(later.any()) and i > 0:
        vals[later] -= u[i1 : i1 + i, positions[later]].T @ e1[:i]
    return vals.T


class _UniformColumns:
    """Uniform codes with per-tensor, per-row or per-row-group scale / zero point (axis 0)."""

    def __init__(self, spec: QSpec, m: int, k: int, clip_search: bool, p: float):
        self.spec, self.m, self.k = spec, m, k
        self.clip_search, self.p = clip_search, p
        self.g = spec.group_size if spec.granularity == "group" else k
        self.n_groups = k // self.g
        self.codes_t = torch.empty(k, m, dtype=torch.int8 if spec.signed else torch.uint8)
        self.scale = torch.empty(m, self.n_groups, dtype=torch.float32)
        self.zp = torch.empty(m, self.n_groups, dtype=torch.int32)
        self._done = [False] * self.n_groups
        self._s64 = self._z64 = None

    def group_of(self, col: int) -> int:
        return col // self.g

    def group_cols(self, group: int) -> torch.Tensor:
        return torch.arange(group * self.g, (group + 1) * self.g)

    def fitted(self, group: int) -> bool:
        return self._done[group]

    def fit(self, group: int, cols: torch.Tensor, hdiag: torch.Tensor) -> None:
        x = cols.to(torch.float32)
        if self.spec.granularity == "tensor":
            fspec = self.spec
        else:
            fspec = self.spec.replace(granularity="channel", group_size=None, axis=0)
        _, s, z = uniform.quantize_weight(x, fspec, clip_search=self.clip_search, p=self.p)
        s = s.expand(self.m) if s.dim() == 0 else s
        z = z.expand(self.m) if z.dim() == 0 else z
        self.scale[:, group] = s
        self.zp[:, group] = z
        self._done[group] = True
        self._s64, self._z64 = s.to(torch.float64), z.to(torch.float64)
        self._cur = group

    def round(self, col: int, w: torch.Tensor) -> torch.Tensor:
        group = col // self.g
        if group != self._cur:  # act_order revisits older groups
            self._s64 = self.scale[:, group].to(torch.float64)
            self._z64 = self.zp[:, group].to(torch.float64)
            self._cur = group
        q = torch.round(w / self._s64).add_(self._z64).clamp_(self.spec.qmin, self.spec.qmax)
        self.codes_t[col] = q
        return q.sub_(self._z64).mul_(self._s64)

    def result(self) -> UniformWeight:
        if self.spec.granularity == "tensor":
            scale, zp = self.scale[0, 0].clone(), self.zp[0, 0].clone()
        elif self.spec.granularity == "channel":
            scale, zp = self.scale[:, 0].contiguous(), self.zp[:, 0].contiguous()
        else:
            scale, zp = self.scale.contiguous(), self.zp.contiguous()
        return UniformWeight(self.codes_t.T.contiguous(), scale, zp, self.spec)


class _GridColumns:
    """Block-scaled codes on a grid fitted once from the whole weight (its row scales need every group)."""

    def __init__(self, grid: block_scaled.BlockGrid, m: int, k: int):
        self.grid, self.g = grid, grid.spec.group_size
        d, mn = grid.scales()
        self.d, self.mn = d.to(torch.float64), mn.to(torch.float64)
        self.qmax = grid.spec.qmax
        self.codes_t = torch.zeros(k, m, dtype=torch.uint8)

    def group_of(self, col: int) -> int:
        return col // self.g

    def group_cols(self, group: int) -> torch.Tensor:
        return torch.arange(group * self.g, (group + 1) * self.g)

    def fitted(self, group: int) -> bool:
        return True

    def round(self, col: int, w: torch.Tensor) -> torch.Tensor:
        d, mn = self.d[:, col // self.g], self.mn[:, col // self.g]
        safe = torch.where(d > 0, d, torch.ones_like(d))
        q = torch.where(d > 0, ((w + mn) / safe).round_().clamp_(0, self.qmax), torch.zeros_like(d))
        self.codes_t[col] = q.to(torch.uint8)
        return q * d - mn

    def result(self) -> block_scaled.BlockScaledWeight:
        return self.grid.weight(self.codes_t.T.contiguous())


class _BCQColumns:
    """BCQ with α (and offset z) per row-group fitted by `quantize_bcq`; columns rounded to the nearest level."""

    def __init__(self, spec: QSpec, m: int, k: int, importance: BCQImportance):
        self.spec, self.m, self.k, self.importance = spec, m, k, importance
        self.bits = spec.bits
        self.g = min(spec.group_size, k) if spec.granularity == "group" else k
        self.n_groups = -(-k // self.g)
        self.codes_t = torch.empty(k, m, dtype=torch.uint8)
        self.alpha = torch.empty(self.bits, m, self.n_groups, dtype=torch.float32)
        self.offset = torch.zeros(m, self.n_groups, dtype=torch.float32) if spec.bcq_offset else None
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        c = torch.arange(1 << self.bits)
        self._signs = ((c[:, None] >> torch.arange(self.bits)) & 1).to(torch.float32) * 2 - 1  # [2^q, q]

    def group_of(self, col: int) -> int:
        return col // self.g

    def group_cols(self, group: int) -> torch.Tensor:
        return torch.arange(group * self.g, min((group + 1) * self.g, self.k))

    def fitted(self, group: int) -> bool:
        return group in self._tables

    def fit(self, group: int, cols: torch.Tensor, hdiag: torch.Tensor) -> None:
        s = self.spec
        kw = {"method": s.bcq_method, "rounds": s.bcq_rounds, "importance_exp": float(s.importance_exp),
              "clip_quantile": s.importance_clip_quantile if s.bcq_method == "weighted" else None,
              "offset": s.bcq_offset}
        if self.importance == "hessian":
            imp = hdiag.clamp_min(0).to(torch.float64)[None, :].expand(cols.shape).clone()
            if s.bcq_method == "weighted" and s.importance_exp:
                a = cols.abs()
                imp *= (a / a.amax(dim=1, keepdim=True).clamp_min(1e-300)).pow(float(s.importance_exp))
            kw.update(method="weighted", importance=imp, clip_quantile=s.importance_clip_quantile)
        bq = quantize_bcq(cols.to(torch.float32), self.bits, group_size=None, **kw)
        alpha = bq.alpha[:, :, 0]  # [q, M]
        self.alpha[:, :, group] = alpha
        # the level of code c in row r, summed in float32 in plane order like `BCQWeight.dequantize`
        levels = (alpha[:, :, None] * self._signs.T[:, None, :]).sum(dim=0)  # [M, 2^q]
        if bq.offset is not None:
            self.offset[:, group] = bq.offset[:, 0]
            levels = levels + bq.offset[:, 0:1]
        srt, perm = levels.to(torch.float64).sort(dim=1)
        mids = (srt[:, 1:] + srt[:, :-1]) * 0.5
        self._tables[group] = (srt, perm.to(torch.uint8), mids.contiguous())

    def round(self, col: int, w: torch.Tensor) -> torch.Tensor:
        srt, perm, mids = self._tables[col // self.g]
        rank = (w[:, None] > mids).sum(dim=1, keepdim=True)
        self.codes_t[col] = perm.gather(1, rank)[:, 0]
        return srt.gather(1, rank)[:, 0]

    def result(self) -> BCQWeight:
        codes = self.codes_t.T
        signs = torch.stack([((codes >> i) & 1).to(torch.int8) * 2 - 1 for i in range(self.bits)])
        return BCQWeight.from_signs(signs, self.alpha, self.offset, group_size=self.g)
