"""embedding-rowwise: row-wise 4/8-bit uniform embedding tables with a greedy range shrink per row.

Each annotated Gather (embedding) weight ``[V, D]`` gets one scale and zero point per row (a `UniformWeight`
with a ``channel`` / axis-0 spec, which ``lower-embedding`` turns into a row-wise quantized gather). The range
``[lo, hi]`` of each row starts at its min/max and is shrunk greedily: with ``step = (hi − lo) / bins``, each
iteration moves whichever end (``lo + step`` or ``hi − step``) gives the lower squared round-trip error of the
row, until ``max_trim`` of the range is cut; the best range seen along the way is kept (a local optimum of
the path, never worse than min/max). All rows move at once (vectorized), in chunks of rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qgraph.errors import PipelineError
from qgraph.ir.meta import ANNOTATION_KEY, QWEIGHT_KEY
from qgraph.pass_base import POSITIVE_INT, Pass, PassResult, Rule, in_range, validate
from qgraph.progress import progress
from qgraph.quant import uniform
from qgraph.quant.qspec import Annotation, QSpec
from qgraph.quant.qtensor import UniformWeight
from qgraph.registry import register_pass

ROWWISE_BITS = Rule(lambda b: b is None or b in (4, 8), "4 or 8 (the row-wise gather kernels), or none")

_CHUNK_ELEMS = 1 << 20


def rowwise_spec(bits: int) -> QSpec:
    """Signed, affine, one scale / zero point per row (the layout ``lower-embedding`` takes)."""
    return QSpec.uniform(bits, granularity="channel", axis=0, symmetric=False)


def greedy_row_ranges(w: torch.Tensor, spec: QSpec, bins: int = 200, max_trim: float = 0.16
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(lo, hi)`` of ``w [V, D]`` by the greedy range shrink (see the module doc)."""
    if bins < 1 or not 0.0 <= max_trim < 1.0:
        raise PipelineError(f"embedding-rowwise needs bins >= 1 and 0 <= max_trim < 1; got {bins}, {max_trim}")
    w = w.detach().to(torch.float32)
    lo_all, hi_all = w.amin(dim=1), w.amax(dim=1)
    steps = int(bins * max_trim)
    rows = max(1, _CHUNK_ELEMS // max(1, w.shape[1]))
    flat = spec.replace(granularity="tensor", group_size=None)
    for a in range(0, w.shape[0], rows):
        x = w[a:a + rows]
        lo, hi = lo_all[a:a + rows].clone(), hi_all[a:a + rows].clone()
        step = (hi - lo) / bins
        best = _row_error(x, lo, hi, flat)
        best_lo, best_hi = lo.clone(), hi.clone()
        for _ in range(steps):
            e_left = _row_error(x, lo + step, hi, flat)
            e_right = _row_error(x, lo, hi - step, flat)
            left = e_left < e_right
            lo = torch.where(left, lo + step, lo)
            hi = torch.where(left, hi, hi - step)
            e = torch.minimum(e_left, e_right)
            better = e < best
            best = torch.where(better, e, best)
            best_lo = torch.where(better, lo, best_lo)
            best_hi = torch.where(better, hi, best_hi)
        lo_all[a:a + rows], hi_all[a:a + rows] = best_lo, best_hi
    return lo_all, hi_all


def quantize_rowwise(w: torch.Tensor, bits: int = 8, bins: int = 200, max_trim: float = 0.16) -> UniformWeight:
    """A row-wise `UniformWeight` of ``w [V, D]`` with greedily shrunk row ranges (``max_trim=0``: min/max)."""
    spec = rowwise_spec(bits)
    w = w.detach().to(torch.float32)
    lo, hi = greedy_row_ranges(w, spec, bins, max_trim) if max_trim > 0 else (w.amin(1), w.amax(1))
    scale, zp = uniform.compute_qparams(lo, hi, spec)
    return UniformWeight(uniform.quantize(w, scale, zp, spec), scale, zp, spec)


def _row_error(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, flat: QSpec) -> torch.Tensor:
    """Σ over each row of the squared fake-quant error with that row's range ``[lo, hi]``."""
    s, z = uniform.compute_qparams(lo, hi, flat)
    s, zf = s[:, None], z.to(torch.float32)[:, None]
    q = torch.round(x / s).add_(zf).clamp_(flat.qmin, flat.qmax)
    return q.sub_(zf).mul_(s).sub_(x).square_().sum(dim=1)


@register_pass("embedding-rowwise", after=("annotate",), before=("gptq", "quantize-weights", "insert-fq"),
               requires=("annotated",))
class EmbeddingRowwise(Pass):
    """Row-wise uniform codes for annotated embedding tables (Gather weights).

    ``bits``: 4 or 8 (default: the annotated spec's bits when it is a uniform spec of 4 or 8 bits, else 8);
    ``bins`` / ``max_trim``: the greedy range shrink (``max_trim=0`` keeps min/max); ``tied``: a Linear that
    uses the very same weight tensor (a tied LM head) gets the same quantized table (and a weight-only
    annotation), so the table is stored once.
    """

    @dataclass(frozen=True)
    class Options:
        bits: int | None = None
        bins: int = 200
        max_trim: float = 0.16
        tied: bool = False

        def __post_init__(self):
            validate(self, bits=ROWWISE_BITS, bins=POSITIVE_INT, max_trim=in_range(0, 1, hi_open=True))

    def run(self, graph, ctx) -> PassResult:
        o = self.options
        todo = []
        for node in graph.nodes():
            meta = graph.meta(node)
            ann = meta.get(ANNOTATION_KEY)
            w = graph.param(node, "weight")
            if graph.op_type(node) != "Gather" or ann is None or ann.weight is None or w is None or w.dim() != 2:
                continue
            if QWEIGHT_KEY not in meta:
                todo.append((node, ann.weight, w))
        layers = ctx.report.setdefault("layers", [])
        tied = 0
        for node, spec, param in progress(todo, desc="embedding-rowwise", enabled=ctx.progress, unit="table"):
            w = param.detach()
            bits = o.bits or (spec.bits if spec.scheme == "uniform" and spec.bits in (4, 8) else 8)
            q = quantize_rowwise(w, bits, o.bins, o.max_trim)
            graph.meta(node)[QWEIGHT_KEY] = q
            err = float((q.dequantize() - w).norm() / w.norm().clamp_min(1e-30))
            layers.append({"node": graph.qualname(node), "op": "Gather", "spec": str(q.spec), "method": "rowwise-greedy",
                           "rel_weight_err": err, "fp32_bytes": w.numel() * 4, "bytes": int(q.nbytes)})
            if o.tied:
                tied += self._share(graph, param, q, layers)
        return PassResult(graph, modified=bool(todo), preserved=frozenset({"*"}),
                          stats={"tables": len(todo), "tied": tied})

    @staticmethod
    def _share(graph, param, q: UniformWeight, layers) -> int:
        n = 0
        for other in graph.nodes():
            if graph.op_type(other) != "Gemm" or graph.param(other, "weight") is not param:
                continue
            meta = graph.meta(other)
            ann = meta.get(ANNOTATION_KEY)
            if ann is not None and ann.inputs:
                continue  # an int8 activation path wants its own weight codes
            meta[ANNOTATION_KEY] = Annotation(weight=q.spec)
            meta[QWEIGHT_KEY] = q
            layers.append({"node": graph.qualname(other), "op": "Gemm", "spec": str(q.spec), "method": "tied-embedding",
                           "fp32_bytes": param.numel() * 4, "bytes": 0})
            n += 1
        return n
