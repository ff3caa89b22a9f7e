"""aespa: attention-aware layer-wise quantization of the query / key / value projections.

[Kim et al. 2024, "Towards next-level post-training quantization of hyper-scale transformers"]. The three
projections of one attention are quantized separately (layer-wise, cheap), but each against the error it
causes in the attention, not in its own output. Row-vector layout: ``X [L, D]`` (the shared input of one
sequence), ``W_Q [H·d, D]``, ``W_K, W_V [H_kv·d, D]`` (grouped-query attention: query head ``h`` reads
key/value head ``g(h) = h // (H / H_kv)``), ``Q_h = X W_{Q,h}ᵀ``, ``A_h = softmax(Q_h K_gᵀ/√d + mask)``,
``O_h = A_h V_g``. ``ΔW = W − Ŵ``.

Value (exact, A fixed by the float model): ``ΔO_h = A_h X ΔW_{V,g}ᵀ``, so

    Σ_{h: g(h)=g} ‖A_h X ΔW_{V,g}ᵀ‖² = tr(ΔW_{V,g} H_{V,g} ΔW_{V,g}ᵀ),  H_{V,g} = Σ_{h∈g} Σ_seq (A_h X)ᵀ (A_h X).

A per-head column Hessian: GPTQ runs on the rows of each head with ``H_{V,g}`` in place of ``2XᵀX``.

Query (first order, pre-softmax): the logits move by ``ΔS_h = X ΔW_{Q,h}ᵀ K_gᵀ/√d``, and

    ‖ΔS_h‖² ∝ tr(K_g ΔW_{Q,h} XᵀX ΔW_{Q,h}ᵀ K_gᵀ) = tr(ΔW_{Q,h} (XᵀX) ΔW_{Q,h}ᵀ (K_gᵀK_g)).

Summed over sequences this couples ``XᵀX`` and ``KᵀK`` of the same sequence; aespa's Kronecker approximation
takes the two expectations apart: ``E ≈ tr(G_h ΔW_{Q,h} H_X ΔW_{Q,h}ᵀ)`` with ``H_X = E[XᵀX]`` (the GPTQ
Hessian) and the key covariance ``G_h = E[k kᵀ] = W_{K,g} H_X W_{K,g}ᵀ`` (``d×d``, from the same statistics).
Key, symmetrically: ``ΔS_h = Q_h ΔK_gᵀ`` ⇒ ``G_g = Σ_{h∈g} W_{Q,h} H_X W_{Q,h}ᵀ``. Approximations made: the
softmax Jacobian is dropped (the logit error stands for the probability error), the causal mask is ignored in
``G`` (every key counts for every query), and RoPE's rotation ``R_{s−t}`` between query and key positions is
taken as the identity (pre-RoPE covariances: exact without RoPE, and for RoPE's slowly rotating dimensions).

With a Kronecker loss ``tr(G ΔW H ΔWᵀ)`` GPTQ needs nothing new: fixing column ``j`` (all rows) with error
``e``, the optimal move of the remaining columns solves ``G Δ H_{:,rest} = 0`` ⇒ ``Δ_rest = −e H_{j,rest}
H_{rest,rest}⁻¹`` whatever ``G`` is — plain GPTQ with ``H_X``. ``G`` matters where rows interact: in the
rounding refinement below, which optimizes the full quadratic.

Refinement (`refine_rounding`): AdaRound-style learned rounding on the quadratic objective. Every element may
keep GPTQ's level or move one level toward its float value: ``Ŵ = lo + h(V) (hi − lo)`` with the rectified
sigmoid ``h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)`` (ζ = 1.1, γ = −0.1) and the regulariser
``λ · mean(1 − |2h − 1|^β)`` (β annealed 20 → 2 after a warm-up); ``V`` starts where the relaxed weight equals
the float weight (inside the bracket). Gradients are analytic (``∂/∂Ŵ tr(GΔHΔᵀ) = −2 G Δ H``), Adam on V; the
final code rounds ``h ≥ ½`` and, per head, is kept only when its loss is below GPTQ's. Levels (the quantizer's
scales / zero points, or BCQ α and offsets) stay those GPTQ fitted, so the result has the same layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qgraph.errors import SpecError
from qgraph.quant.bcq_weight import BCQWeight
from qgraph.quant.block_scaled import BlockScaledWeight
from qgraph.quant.gptq import gptq
from qgraph.quant.qspec import QSpec
from qgraph.quant.qtensor import UniformWeight
from qgraph.quant.uniform import one_thread

ZETA, GAMMA = 1.1, -0.1


# --- level grids: a quantized matrix as per-(row, group) sorted level tables and a rank per element ------------
@dataclass
class LevelGrid:
    """``levels [M, G, n]`` (ascending per row-group), ``rank [M, K]`` (index into its group's levels), and
    what is needed to rebuild the quantized weight from new ranks (``kind`` ``"uniform"``, ``"bcq"`` or
    ``"block"``)."""

    levels: torch.Tensor
    rank: torch.Tensor
    group_size: int
    kind: str
    spec: QSpec | None = None
    scale: torch.Tensor | None = None  # uniform: [M, G]
    zero_point: torch.Tensor | None = None
    alpha: torch.Tensor | None = None  # bcq: [q, M, G]
    offset: torch.Tensor | None = None  # bcq: [M, G] or None
    perm: torch.Tensor | None = None  # bcq: [M, G, 2^q] code of each sorted level
    block: BlockScaledWeight | None = None  # block-scaled: the weight whose codes the ranks replace

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.rank.shape)

    def expanded(self) -> torch.Tensor:
        """Level table of every element's group, ``[M, K, n]``."""
        k = self.rank.shape[1]
        return self.levels.repeat_interleave(self.group_size, dim=1)[:, :k]

    def values(self, rank: torch.Tensor | None = None) -> torch.Tensor:
        r = self.rank if rank is None else rank
        return self.expanded().gather(2, r.unsqueeze(2)).squeeze(2)

    def rows(self, idx: slice) -> LevelGrid:
        def pick(t):
            return (None if t is None else t[idx])
        return LevelGrid(self.levels[idx], self.rank[idx], self.group_size, self.kind, self.spec, pick(self.scale),
                         pick(self.zero_point), None if self.alpha is None else self.alpha[:, idx], pick(self.offset),
                         pick(self.perm), None if self.block is None else self.block.rows(idx))

    @staticmethod
    def cat(parts: list[LevelGrid]) -> LevelGrid:
        p0 = parts[0]
        if any(p.kind != p0.kind or p.group_size != p0.group_size or p.levels.shape[2] != p0.levels.shape[2]
               for p in parts):
            raise SpecError("LevelGrid.cat: parts disagree in kind, group size or number of levels")

        def cat(name, dim=0):
            ts = [getattr(p, name) for p in parts]
            return None if ts[0] is None else torch.cat(ts, dim)

        block = None if p0.block is None else BlockScaledWeight.cat([p.block for p in parts])
        return LevelGrid(cat("levels"), cat("rank"), p0.group_size, p0.kind, p0.spec, cat("scale"),
                         cat("zero_point"), cat("alpha", 1), cat("offset"), cat("perm"), block)

    def to_qweight(self, rank: torch.Tensor | None = None) -> UniformWeight | BCQWeight | BlockScaledWeight:
        r = self.rank if rank is None else rank
        if self.kind == "block":
            return self.block.with_codes(r)
        if self.kind == "uniform":
            spec = self.spec
            codes = (r + spec.qmin).to(torch.int8 if spec.signed else torch.uint8)
            if spec.granularity == "group":
                scale, zp = self.scale, self.zero_point
            else:  # channel
                scale, zp = self.scale[:, 0].contiguous(), self.zero_point[:, 0].contiguous()
            return UniformWeight(codes.contiguous(), scale.contiguous(), zp.contiguous(), spec)
        k = r.shape[1]
        perm = self.perm.repeat_interleave(self.group_size, dim=1)[:, :k]
        code = perm.gather(2, r.unsqueeze(2)).squeeze(2)
        bits = self.alpha.shape[0]
        signs = torch.stack([((code >> i) & 1).to(torch.int8) * 2 - 1 for i in range(bits)])
        return BCQWeight.from_signs(signs, self.alpha, self.offset, group_size=self.group_size)


def level_grid(qweight: UniformWeight | BCQWeight | BlockScaledWeight) -> LevelGrid:
    """The `LevelGrid` of a per-channel / per-group uniform weight (axis 0), a BCQ or a block-scaled weight."""
    if isinstance(qweight, BlockScaledWeight):
        d, mn = qweight.scales()
        c = torch.arange(qweight.spec.qmax + 1, dtype=torch.float64)
        levels = d.double()[:, :, None] * c - mn.double()[:, :, None]  # ascending: d >= 0
        return LevelGrid(levels, qweight.codes.long(), qweight.group_size, "block", spec=qweight.spec, block=qweight)
    if isinstance(qweight, BCQWeight):
        m, k = qweight.shape
        bits, g = qweight.bits, qweight.group_size
        c = torch.arange(1 << bits)
        table = ((c[:, None] >> torch.arange(bits)) & 1).to(torch.float32) * 2 - 1  # [2^q, q]
        lv = torch.einsum("qmg,nq->mgn", qweight.alpha, table)
        if qweight.offset is not None:
            lv = lv + qweight.offset[:, :, None]
        levels, perm = lv.sort(dim=2)
        signs = qweight.signs()
        code = torch.zeros(m, k, dtype=torch.long)
        for i in range(bits):
            code |= (signs[i] > 0).long() << i
        inv = torch.empty_like(perm)
        inv.scatter_(2, perm, torch.arange(1 << bits).expand_as(perm).contiguous())
        rank = inv.repeat_interleave(g, dim=1)[:, :k].gather(2, code.unsqueeze(2)).squeeze(2)
        return LevelGrid(levels.to(torch.float64), rank, g, "bcq", alpha=qweight.alpha, offset=qweight.offset,
                         perm=perm)
    spec = qweight.spec
    if spec.granularity not in ("channel", "group") or spec.axis % 2 != 0:
        raise SpecError(f"aespa refines per-channel or per-group (axis 0) uniform weights, got {spec}; "
                        "use a channel/group spec or plain gptq")
    m, k = qweight.codes.shape
    scale = qweight.scale.reshape(m, -1).to(torch.float64)
    zp = qweight.zero_point.reshape(m, -1).to(torch.float64)
    g = spec.group_size if spec.granularity == "group" else k
    steps = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.float64)
    levels = (steps[None, None, :] - zp[:, :, None]) * scale[:, :, None]
    rank = qweight.codes.long() - spec.qmin
    return LevelGrid(levels, rank, g, "uniform", spec=spec, scale=qweight.scale.reshape(m, -1),
                     zero_point=qweight.zero_point.reshape(m, -1))


# --- the quadratic objective ------------------------------------------------------------------------------------
def block_loss(d: torch.Tensor, h: torch.Tensor, g: torch.Tensor | None, nb: int) -> torch.Tensor:
    """Per row block: ``tr(G_b D_b H_b D_bᵀ)`` for ``D [M, K]`` split into ``nb`` blocks of rows; ``h``
    ``[K, K]`` or ``[nb, K, K]``, ``g`` None (identity) or ``[nb, d, d]``. Returns ``[nb]``."""
    return (d.reshape(nb, -1, d.shape[1]) * _gdh(d, h, g, nb)).sum(dim=(1, 2))


def _gdh(d, h, g, nb):
    m, k = d.shape
    db = d.reshape(nb, m // nb, k)
    dh = (d @ h).reshape(nb, m // nb, k) if h.dim() == 2 else torch.bmm(db, h)
    return dh if g is None else torch.bmm(g, dh)


@dataclass(frozen=True)
class RefineConfig:
    """Learned-rounding knobs. AdaRound stage: ``iters`` Adam steps at ``lr`` on V, regulariser weight ``lam``
    (the reconstruction term is normalized to 1 at GPTQ's solution), β from ``beta[0]`` to ``beta[1]`` after
    ``warmup`` of the steps, V started at ``init`` × (the float weight's position in its bracket). Descent stage:
    up to ``descent_rounds`` rounds of exact single-level moves (see `refine_rounding`)."""

    iters: int = 50
    lr: float = 0.05
    lam: float = 3.0
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    init: float = 0.2
    descent_rounds: int = 20

    def check(self) -> None:
        if self.iters < 0 or self.descent_rounds < 0 or not self.lr > 0 or not self.lam >= 0 \
                or not 0 <= self.warmup < 1 or not 0 <= self.init <= 1:
            raise SpecError("aespa refinement needs iters >= 0, descent_rounds >= 0, lr > 0, lam >= 0, "
                            f"0 <= warmup < 1 and 0 <= init <= 1; got {self}")


@dataclass(frozen=True)
class RefineResult:
    """``qweight`` / ``w_hat`` after refinement; ``loss_init`` / ``loss`` the objective before / after
    (summed over blocks); ``blocks_improved`` how many row blocks took a refined rounding."""

    qweight: UniformWeight | BCQWeight
    w_hat: torch.Tensor
    loss_init: float
    loss: float
    blocks_improved: int


class _Problem:
    """The quadratic ``Σ_b tr(G_b D_b H_b D_bᵀ)``, ``D = W − levels[rank]``, in float32."""

    def __init__(self, w, grid: LevelGrid, h, g, nb):
        self.m, self.k = w.shape
        self.nb = nb
        self.w = w.detach().to(torch.float32)
        self.h = h.detach().to(torch.float32)
        self.g = None if g is None else g.detach().to(torch.float32)
        self.lv = grid.expanded().to(torch.float32)
        self.n_lv = self.lv.shape[2]
        hd = torch.diagonal(self.h, dim1=-2, dim2=-1)
        hd = hd.expand(self.m, self.k) if hd.dim() == 1 else hd.repeat_interleave(self.m // nb, 0)
        gd = torch.ones(self.m) if self.g is None else torch.diagonal(self.g, dim1=-2, dim2=-1).reshape(self.m)
        self.curv = gd[:, None] * hd  # second derivative of the loss along one element

    def level(self, rank):
        return self.lv.gather(2, rank.unsqueeze(2)).squeeze(2)

    def gdh(self, d):
        return _gdh(d, self.h, self.g, self.nb).reshape(self.m, self.k)

    def blocks(self, d, gdh=None):
        gdh = self.gdh(d) if gdh is None else gdh
        return (d * gdh).reshape(self.nb, -1).sum(1)


def _adaround(p: _Problem, rank: torch.Tensor, norm: float, cfg: RefineConfig) -> torch.Tensor:
    """Rectified-sigmoid learned rounding between each element's level and the next level toward its float
    value; returns the hard ranks (``h ≥ ½``)."""
    lo = p.level(rank)
    nbr = (rank + torch.sign(p.w - lo).long()).clamp(0, p.n_lv - 1)
    delta = p.level(nbr) - lo
    active = delta != 0
    base = p.w - lo
    frac = torch.where(active, base / torch.where(active, delta, torch.ones_like(delta)), torch.zeros_like(delta))
    frac = (cfg.init * frac).clamp(0.02, 0.98)
    v = torch.log((frac - GAMMA) / (ZETA - frac)).where(active, torch.full_like(frac, -10.0))
    m1, m2 = torch.zeros_like(v), torch.zeros_like(v)  # Adam moments (β1 = 0.9, β2 = 0.999)
    n_active = float(active.sum())
    warm = int(cfg.warmup * cfg.iters)
    span = ZETA - GAMMA
    for it in range(cfg.iters):
        sig = torch.sigmoid(v)
        raw = sig * span + GAMMA
        hv = raw.clamp(0, 1)
        grad_h = p.gdh(base - hv * delta).mul_(delta).mul_(-2.0 / norm)  # ∂/∂h of tr(GDHDᵀ)/norm
        if it >= warm:
            beta = cfg.beta[0] + (cfg.beta[1] - cfg.beta[0]) * (it - warm) / max(1, cfg.iters - warm)
            u = 2 * hv - 1
            grad_h -= (2 * cfg.lam * beta / n_active) * u.abs().pow(beta - 1) * u.sign()
        inside = (raw > 0) & (raw < 1) & active
        grad = torch.where(inside, grad_h * sig * (1 - sig) * span, 0.0)
        m1.mul_(0.9).add_(grad, alpha=0.1)
        m2.mul_(0.999).addcmul_(grad, grad, value=0.001)
        step = cfg.lr / (1 - 0.9 ** (it + 1))
        v.addcdiv_(m1, (m2 / (1 - 0.999 ** (it + 1))).sqrt_().add_(1e-8), value=-step)
    up = (torch.sigmoid(v) * span + GAMMA >= 0.5) & active
    return torch.where(up, nbr, rank)


def _descend(p: _Problem, rank: torch.Tensor, rounds: int, per_row: int = 8) -> torch.Tensor:
    """Exact descent by single-level moves. Moving element (i, j) by ``s`` changes the loss by
    ``−2 s Γ_ij + s² G_ii H_jj`` with ``Γ = G D H``. Each round takes, in every row, up to ``t`` of the most
    improving moves; their joint effect ``ΔΓ = G ΔD H`` is computed from the moved entries only (rows of H),
    and each unit (a row when G is the identity, else a row block) keeps its moves only if its loss goes down
    — otherwise its ``t`` is halved, down to the single best move of the unit, which always helps."""
    m, k = p.m, p.k
    rows_per = m // p.nb
    unit = torch.arange(m) if p.g is None else torch.arange(m) // rows_per
    n_units = m if p.g is None else p.nb
    t_unit = torch.full((n_units,), per_row, dtype=torch.long)
    cur = p.level(rank)
    gam = p.gdh(p.w - cur)
    h = p.h
    blk = torch.arange(m) // rows_per
    for _ in range(rounds):
        best, best_s = torch.zeros(m, k), torch.zeros(m, k)
        best_r = rank
        for step in (-1, 1):
            r2 = (rank + step).clamp(0, p.n_lv - 1)
            s = p.level(r2) - cur
            dl = -2 * s * gam + s * s * p.curv
            better = dl < best
            best, best_s = torch.where(better, dl, best), torch.where(better, s, best_s)
            best_r = torch.where(better, r2, best_r)
        t_max = int(t_unit.max())
        gain, col = best.topk(max(1, min(t_max, k)), dim=1, largest=False)  # [M, t] most negative first
        t_row = t_unit[unit]
        use = (gain < 0) & (torch.arange(gain.shape[1])[None, :] < t_row[:, None])
        single = t_unit == 0  # units that fall back to their one best move
        if bool(single.any()):
            uo = unit[:, None].expand_as(gain)
            first = torch.full((n_units,), float("inf")).scatter_reduce(0, uo[:, 0], gain[:, 0], "amin")
            pick = single[unit] & (gain[:, 0] == first[unit]) & (gain[:, 0] < 0)
            use[single[unit]] = False
            use[:, 0] |= pick
        if not bool(use.any()):
            break
        s_sel = best_s.gather(1, col) * use  # [M, t]
        hrows = h[col] if h.dim() == 2 else h[blk[:, None], col]  # [M, t, K]
        e = -(s_sel.unsqueeze(2) * hrows).sum(1)  # ΔD H, ΔD = −s at the moved entries
        dgam = e if p.g is None else torch.bmm(p.g, e.reshape(p.nb, rows_per, k)).reshape(m, k)
        dd = -s_sel
        dl_row = (2 * dd * gam.gather(1, col)).sum(1) + (dd * dgam.gather(1, col)).sum(1)
        dl_unit = torch.zeros(n_units).index_add_(0, unit, dl_row)
        moved_unit = torch.zeros(n_units, dtype=torch.bool).index_add_(0, unit, use.any(1))
        ok = (dl_unit < 0) & moved_unit
        t_unit = torch.where(ok | ~moved_unit, torch.where(t_unit == 0, 1, torch.clamp(t_unit * 2, max=per_row)),
                             t_unit // 2)
        keep = ok[unit]
        if not bool(keep.any()):
            continue
        use &= keep[:, None]
        dgam = torch.where(keep[:, None], dgam, 0.0) if p.g is None else \
            torch.where(ok.repeat_interleave(rows_per)[:, None], dgam, 0.0)
        gam += dgam
        ii, tt = use.nonzero(as_tuple=True)
        jj = col[ii, tt]
        rank = rank.clone()
        rank[ii, jj] = best_r[ii, jj]
        cur = cur.clone()
        cur[ii, jj] += best_s[ii, jj]
    return rank


def refine_rounding(w: torch.Tensor, qweight: UniformWeight | BCQWeight, h: torch.Tensor,
                    g: torch.Tensor | None = None, cfg: RefineConfig = RefineConfig()) -> RefineResult:
    """Refine the rounding of ``qweight`` (an approximation of ``w [M, K]``; its levels stay fixed) on the
    objective ``Σ_b tr(G_b (W − Ŵ)_b H_b (W − Ŵ)_bᵀ)`` over row blocks ``b`` (see the module doc). ``h``:
    ``[K, K]`` shared or ``[nb, K, K]`` per block; ``g``: None (identity) or ``[nb, d, d]``; ``M = nb·d``.

    The AdaRound rounding (``cfg.iters`` > 0; else the given rounding) is polished by the exact descent; each
    row block then takes it only where its loss is below the given rounding's, so no block ever gets worse."""
    cfg.check()
    m, k = w.shape
    nb = h.shape[0] if h.dim() == 3 else (g.shape[0] if g is not None else 1)
    if m % nb or (h.dim() == 3 and tuple(h.shape) != (nb, k, k)) or (h.dim() == 2 and tuple(h.shape) != (k, k)) \
            or (g is not None and tuple(g.shape) != (nb, m // nb, m // nb)):
        raise SpecError(f"refine_rounding: w {tuple(w.shape)}, h {tuple(h.shape)} and g "
                        f"{None if g is None else tuple(g.shape)} do not describe row blocks of one matrix")
    grid = level_grid(qweight)
    with torch.no_grad(), one_thread():  # many small ops: per-op thread fork/join costs more than it saves
        p = _Problem(w, grid, h, g, nb)
        init_blocks = p.blocks(p.w - p.level(grid.rank))
        norm = float(init_blocks.sum())
        best_blocks, best_rank = init_blocks, grid.rank
        if norm > 0 and (cfg.iters or cfg.descent_rounds):
            start = _adaround(p, grid.rank, norm, cfg) if cfg.iters else grid.rank
            r = _descend(p, start, cfg.descent_rounds)
            lb = p.blocks(p.w - p.level(r))
            take = lb < best_blocks
            best_blocks = torch.where(take, lb, best_blocks)
            best_rank = torch.where(take.repeat_interleave(m // nb)[:, None], r, best_rank)
        improved = int((best_blocks < init_blocks).sum())
    if not improved:
        return RefineResult(qweight, grid.values().to(torch.float32), norm, norm, 0)
    return RefineResult(grid.to_qweight(best_rank), grid.values(best_rank).to(torch.float32), norm,
                        float(best_blocks.sum()), improved)


# --- attention statistics ---------------------------------------------------------------------------------------
class ValueHessian:
    """Streaming ``H_{V,g} = 2/N Σ_{h∈g} (A_h X)ᵀ (A_h X)`` per key/value head ``g`` (float64 ``[H_kv, D, D]``)."""

    def __init__(self, d_in: int, n_kv: int):
        self.sum = torch.zeros(n_kv, d_in, d_in, dtype=torch.float64)
        self.rows = 0
        self.n_kv = n_kv

    def add(self, x: torch.Tensor, probs: torch.Tensor) -> None:
        """``x [B, L, D]`` (value-projection input), ``probs [B, H, L, L]`` (attention probabilities)."""
        b, n_heads, lq, lk = probs.shape
        if x.dim() != 3 or x.shape[0] != b or x.shape[1] != lk or n_heads % self.n_kv:
            raise SpecError(f"value Hessian: input {tuple(x.shape)} does not match attention probabilities "
                            f"{tuple(probs.shape)} with {self.n_kv} key/value heads")
        rep = n_heads // self.n_kv
        x32 = x.detach().to(device="cpu", dtype=torch.float32)
        p32 = probs.detach().to(device="cpu", dtype=torch.float32)
        for i in range(b):
            ax = torch.matmul(p32[i], x32[i])  # [H, Lq, D]
            ax = ax.reshape(self.n_kv, rep * lq, -1)
            self.sum += torch.bmm(ax.transpose(1, 2), ax).to(torch.float64)
        self.rows += b * lq

    def value(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.rows, 1))


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False,
                    scale: float | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q kᵀ · scale + mask)`` as scaled_dot_product_attention computes it; ``q [B, H, Lq, d]``,
    ``k [B, H or H_kv, Lk, d]`` (grouped heads are repeated), boolean masks keep where True. ``rows``: only
    these query positions (``[B, H, len(rows), Lk]``)."""
    q = q.to(torch.float32)
    k = k.to(torch.float32)
    lq, lk = q.shape[-2], k.shape[-2]
    pos = torch.arange(lq) if rows is None else rows
    if rows is not None:
        q = q[..., rows, :]
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        keep = torch.arange(lk)[None, :] <= pos[:, None] + (lk - lq)
        s = s.masked_fill(~keep, float("-inf"))
    if mask is not None:
        if rows is not None and mask.shape[-2] == lq:
            mask = mask[..., rows, :]
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(torch.float32)
    return torch.softmax(s, dim=-1).nan_to_num(0.0)


def query_rows(lq: int, n: int | None) -> torch.Tensor | None:
    """``n`` query positions spread evenly over ``0..lq−1`` (None: all of them)."""
    if n is None or n <= 0 or n >= lq:
        return None
    return torch.linspace(0, lq - 1, n).round().long().unique()


def query_row_cov(wk: torch.Tensor, h_x: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """``G_h = W_{K,g(h)} H_X W_{K,g(h)}ᵀ`` for every query head, ``[H, d, d]``."""
    kc = _per_head_cov(wk, h_x, n_kv)  # [H_kv, d, d]
    return kc.repeat_interleave(n_heads // n_kv, dim=0)


def key_row_cov(wq: torch.Tensor, h_x: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """``G_g = Σ_{h∈g} W_{Q,h} H_X W_{Q,h}ᵀ`` for every key/value head, ``[H_kv, d, d]``."""
    qc = _per_head_cov(wq, h_x, n_heads)  # [H, d, d]
    return qc.reshape(n_kv, n_heads // n_kv, *qc.shape[1:]).sum(1)


def _per_head_cov(w: torch.Tensor, h_x: torch.Tensor, n: int) -> torch.Tensor:
    w64 = w.detach().to(torch.float64)
    wh = w64.reshape(n, -1, w64.shape[1])
    return torch.matmul(torch.matmul(wh, h_x.to(torch.float64)), wh.transpose(1, 2))


# --- the three projections ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class AespaResult:
    """One projection: ``qweight`` / ``w_hat``; ``gptq_loss`` and ``loss`` the aespa objective of the GPTQ
    initialisation and of the refined result; ``blocks_improved`` of ``blocks`` heads took the refinement."""

    qweight: UniformWeight | BCQWeight
    w_hat: torch.Tensor
    gptq_loss: float
    loss: float
    blocks_improved: int
    blocks: int


def aespa_qkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, h_x: torch.Tensor, h_v: torch.Tensor,
              specs: tuple[QSpec, QSpec, QSpec], n_heads: int, n_kv: int, cfg: RefineConfig = RefineConfig(),
              refine: tuple[bool, bool, bool] = (True, True, True), **gptq_kw) -> dict[str, AespaResult]:
    """Quantize one attention's projections: ``"q"``/``"k"`` by GPTQ with ``h_x`` then refinement with the
    other side's covariance; ``"v"`` by per-head GPTQ with ``h_v [H_kv, D, D]`` then refinement. ``gptq_kw``
    go to `qgraph.quant.gptq.gptq` (block, damp, act_order, clip_search, p, bcq_importance)."""
    d = wq.shape[0] // n_heads
    if wq.shape[0] != n_heads * d or wk.shape[0] != n_kv * d or wv.shape[0] != n_kv * d or n_heads % n_kv:
        raise SpecError(f"aespa: projections {tuple(wq.shape)}, {tuple(wk.shape)}, {tuple(wv.shape)} do not split "
                        f"into {n_heads} query and {n_kv} key/value heads of one size")
    if tuple(h_v.shape) != (n_kv, wv.shape[1], wv.shape[1]):
        raise SpecError(f"aespa: value Hessian must be [{n_kv}, {wv.shape[1]}, {wv.shape[1]}], got {tuple(h_v.shape)}")
    for s in specs:
        if s.scheme == "uniform" and s.granularity == "tensor":
            raise SpecError(f"aespa needs per-channel or per-group weight specs (heads are quantized apart), got {s}")
    out = {}
    h_x = h_x.to(torch.float64)
    g_q = query_row_cov(wk, h_x, n_heads, n_kv)
    g_k = key_row_cov(wq, h_x, n_heads, n_kv)
    for name, w, spec, g, on in (("q", wq, specs[0], g_q, refine[0]), ("k", wk, specs[1], g_k, refine[1])):
        res = gptq(w, h_x, spec, **gptq_kw)
        out[name] = _refined(w, res.qweight, h_x, g, cfg if on else RefineConfig(iters=0, descent_rounds=0))
    parts = [gptq(wv[i * d:(i + 1) * d], h_v[i], specs[2], **gptq_kw).qweight for i in range(n_kv)]
    grid = LevelGrid.cat([level_grid(p) for p in parts])
    out["v"] = _refined(wv, grid.to_qweight(), h_v, None, cfg if refine[2] else RefineConfig(iters=0, descent_rounds=0))
    return out


def _refined(w, qweight, h, g, cfg) -> AespaResult:
    r = refine_rounding(w, qweight, h, g, cfg)
    nb = h.shape[0] if h.dim() == 3 else g.shape[0]
    return AespaResult(r.qweight, r.w_hat, r.loss_init, r.loss, r.blocks_improved, nb)

