"""embedding-bits-by-frequency: BCQ embedding tables whose rows get more bits the more often their token occurs.

Token counts come from the ids that reach each annotated Gather when the calibration batches run through
the graph (``ctx.calibration``: e.g. calibration plays, tokenized), or from ``ctx.config["token_counts"]``
(a ``[V]`` tensor). Allocation: every row is BCQ-fitted at each candidate bit count (``bits``), giving its
squared error ``e_r(b)``; rows then get the bits minimizing ``Σ_r (c_r + prior) · e_r(b_r)`` under a mean of
``avg_bits`` bits per row (Lagrangian: each row minimizes ``(c_r + prior) e_r(b) + λ b``; λ by bisection).
Frequent rows, whose errors weigh more, end up with more bits; tokens never seen get the fewest.

The result is a `MixedBitsBCQWeight`: one `BCQWeight` per bit class over that class's rows, plus the row →
class map. It dequantizes to the full table (what ``insert-fq`` needs); no lowering pass takes it yet, so the
gather stays a simulated float gather after lowering.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from qgraph.errors import CalibrationError
from qgraph.ir.inputs import batches
from qgraph.ir.meta import ANNOTATION_KEY, QWEIGHT_KEY
from qgraph.pass_base import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    Pass,
    PassResult,
    each,
    in_range,
    option_error,
    optional,
    validate,
)
from qgraph.quant.bcq import quantize_bcq
from qgraph.quant.bcq_weight import BCQWeight
from qgraph.registry import register_pass


@dataclass(frozen=True, eq=False)
class MixedBitsBCQWeight:
    """A ``[V, D]`` table stored as BCQ codes with a bit count per row.

    ``parts``: ``(bits, rows, BCQWeight)`` per bit class, ``rows`` the int64 row indices of that class and the
    BCQWeight holding them in that order; ``row_bits``: uint8 ``[V]``, each row's bit count.
    """

    parts: tuple[tuple[int, torch.Tensor, BCQWeight], ...]
    row_bits: torch.Tensor
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        """Packed planes and α of every class, plus one byte per row for its class."""
        return sum(int(bq.nbytes) for _, _, bq in self.parts) + self.row_bits.numel()

    @property
    def mean_bits(self) -> float:
        return float(self.row_bits.to(torch.float64).mean())

    def dequantize(self) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=torch.float32)
        for _, rows, bq in self.parts:
            out[rows] = bq.dequantize()
        return out


def token_counts_of(graph, node, data, vocab: int) -> torch.Tensor:
    """How often each id reaches the Gather ``node`` over the batches ``data`` (float64 ``[vocab]``)."""
    counts = torch.zeros(vocab, dtype=torch.float64)

    def on_value(_i, ids):
        flat = ids.reshape(-1).to(torch.int64)
        counts.add_(torch.bincount(flat.clamp(0, vocab - 1), minlength=vocab).to(torch.float64))

    graph.collect([(node, 0)], data, on_value)
    return counts


def allocate_bits(counts: torch.Tensor, errors: torch.Tensor, bits: tuple[int, ...], avg_bits: float,
                  prior: float = 1.0) -> torch.Tensor:
    """Per-row index into ``bits`` minimizing ``Σ (c + prior) e[r, b]`` with mean bits ≤ ``avg_bits``.

    ``errors``: ``[V, len(bits)]``. Exact for the Lagrangian relaxation; the returned allocation meets the
    budget (λ is the smallest found that does)."""
    b = torch.tensor(bits, dtype=torch.float64)
    weight = (counts.to(torch.float64) + prior)[:, None] * errors.to(torch.float64)

    def pick(lam: float) -> torch.Tensor:
        return (weight + lam * b[None, :]).argmin(dim=1)

    if float(b[pick(0.0)].mean()) <= avg_bits:
        return pick(0.0)
    lo, hi = 0.0, 1.0
    while float(b[pick(hi)].mean()) > avg_bits:
        hi *= 4.0
        if hi > 1e30:
            break
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(b[pick(mid)].mean()) > avg_bits:
            lo = mid
        else:
            hi = mid
    return pick(hi)


@register_pass("embedding-bits-by-frequency", after=("annotate",), before=("gptq", "quantize-weights", "insert-fq"),
               requires=("annotated",))
class EmbeddingBitsByFrequency(Pass):
    """Per-row BCQ bits for annotated embedding tables, chosen from token frequencies.

    ``bits``: candidate bit counts; ``avg_bits``: mean bits per row; ``method`` / ``rounds`` / ``group_size``:
    the BCQ fit (α per row when ``group_size`` is None); ``prior``: pseudo-count added to every token;
    ``max_batches``: calibration batches to count tokens on.
    """

    @dataclass(frozen=True)
    class Options:
        bits: tuple[int, ...] = (1, 2, 3, 4)
        avg_bits: float = 2.5
        method: Literal["greedy", "alternating", "weighted"] = "alternating"
        rounds: int = 15
        group_size: int | None = None
        prior: float = 1.0
        max_batches: int | None = None

        def __post_init__(self):
            validate(self, bits=each(in_range(1, 8), nonempty=True), avg_bits=POSITIVE, rounds=NON_NEGATIVE,
                     group_size=optional(POSITIVE_INT), prior=NON_NEGATIVE, max_batches=optional(POSITIVE_INT))
            if self.avg_bits < min(self.bits):
                raise option_error("avg_bits", f">= the fewest bits {min(self.bits)}", self.avg_bits)

    def run(self, graph, ctx) -> PassResult:
        o = self.options
        bits = tuple(sorted(set(o.bits)))
        todo = []
        for node in graph.nodes():
            ann = graph.meta(node).get(ANNOTATION_KEY)
            w = graph.param(node, "weight")
            if graph.op_type(node) == "Gather" and ann is not None and ann.weight is not None and w is not None \
                    and w.dim() == 2 and QWEIGHT_KEY not in graph.meta(node):
                todo.append((node, w))
        layers = ctx.report.setdefault("layers", [])
        summary = {}
        for node, w in todo:
            counts = self._counts(graph, node, ctx, w.shape[0])
            q = self._quantize(w.detach().float(), counts, bits)
            graph.meta(node)[QWEIGHT_KEY] = q
            w = w.detach()
            rel = float((q.dequantize() - w).norm() / w.norm().clamp_min(1e-30))
            hist = {b: int((q.row_bits == b).sum()) for b in bits}
            covered = {b: float(counts[q.row_bits == b].sum() / counts.sum().clamp_min(1)) for b in bits}
            layers.append({"node": graph.qualname(node), "op": "Gather", "spec": f"bcq-mixed{bits}", "method":
                           "bits-by-frequency", "rel_weight_err": rel, "fp32_bytes": w.numel() * 4,
                           "bytes": int(q.nbytes), "mean_bits": q.mean_bits})
            summary[graph.qualname(node)] = {"rows_per_bits": hist, "token_share_per_bits": covered,
                                             "mean_bits": q.mean_bits}
        if summary:
            ctx.report["embedding-bits-by-frequency"] = summary
        return PassResult(graph, modified=bool(todo), preserved=frozenset({"*"}), stats={"tables": len(todo)})

    def _counts(self, graph, node, ctx, vocab: int) -> torch.Tensor:
        given = ctx.config.get("token_counts")
        if given is not None:
            counts = torch.as_tensor(given, dtype=torch.float64).reshape(-1)
            if counts.numel() != vocab:
                raise CalibrationError(f"config token_counts has {counts.numel()} entries; the table has {vocab} rows")
            return counts
        if ctx.calibration is None:
            raise CalibrationError("embedding-bits-by-frequency counts tokens on calibration data: pass calib=[...] "
                                   "(tokenized text) or config['token_counts'] ([vocab] counts)")
        counts = token_counts_of(graph, node, batches(ctx.calibration, graph, self.options.max_batches), vocab)
        if counts.sum() == 0:
            raise CalibrationError("no token ids reached the embedding during calibration")
        return counts

    def _quantize(self, w: torch.Tensor, counts: torch.Tensor, bits: tuple[int, ...]):
        o = self.options
        fits = {}
        errs = []
        for b in bits:
            bq = quantize_bcq(w, b, group_size=o.group_size, method=o.method, rounds=o.rounds)
            fits[b] = bq
            errs.append((bq.dequantize() - w).square().sum(dim=1).to(torch.float64))
        errors = torch.stack(errs, dim=1)
        choice = allocate_bits(counts, errors, bits, o.avg_bits, o.prior)
        parts = []
        for j, b in enumerate(bits):
            rows = (choice == j).nonzero().squeeze(1)
            if rows.numel():
                # a row's BCQ fit only depends on the row itself, so the full fit's rows are reused as is
                parts.append((b, rows, _select_rows(fits[b], rows)))
        row_bits = torch.tensor(bits, dtype=torch.uint8)[choice]
        return MixedBitsBCQWeight(tuple(parts), row_bits, (int(w.shape[0]), int(w.shape[1])))


def _select_rows(bq: BCQWeight, rows: torch.Tensor) -> BCQWeight:
    return BCQWeight(planes=bq.planes[:, rows].contiguous(), alpha=bq.alpha[:, rows].contiguous(),
                     offset=None if bq.offset is None else bq.offset[rows].contiguous(),
                     shape=(int(rows.numel()), bq.shape[1]), group_size=bq.group_size)
