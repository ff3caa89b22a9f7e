"""embedding-rowwise (greedy range shrink, lower-embedding, tied heads) and embedding-bits-by-frequency."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qgraph
from qgraph.context import PassContext
from qgraph.errors import CalibrationError, PipelineError
from qgraph.ir.trace import trace
from qgraph.pass_manager import PassManager
from qgraph.passes.embedding_bits_by_frequency import MixedBitsBCQWeight, allocate_bits
from qgraph.passes.embedding_rowwise import greedy_row_ranges, quantize_rowwise, rowwise_spec
from qgraph.passes.quantize_weights import QWEIGHT_KEY
from qgraph.quant.qtensor import UniformWeight

V, D = 200, 24


class _TinyLM(nn.Module):
    def __init__(self, tied=True):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.head = nn.Linear(D, V, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def _model(tied=True, seed=0):
    torch.manual_seed(seed)
    return _TinyLM(tied).eval()


def _zipf_calib(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, V + 1, dtype=torch.float64)
    return [(torch.multinomial(p / p.sum(), 64, replacement=True, generator=g).reshape(4, 16),) for _ in range(n)]


def _sq_err(q, w):
    return (q.dequantize() - w).square().sum(dim=1)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([4, 8]), st.floats(0.5, 4.0))
def test_greedy_shrink_never_worse_than_min_max_and_trims_at_most_16_percent(seed, bits, tail):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(40, 64, generator=g) * torch.rand(40, 1, generator=g)
    w[:, 0] *= 1 + tail  # a heavy entry per row gives the shrink something to trim
    lo, hi = greedy_row_ranges(w, rowwise_spec(bits))
    span = w.amax(1) - w.amin(1)
    trimmed = (lo - w.amin(1)) + (w.amax(1) - hi)
    assert bool((trimmed <= 0.16 * span * (1 + 1e-5) + 1e-7).all())
    greedy, minmax = quantize_rowwise(w, bits), quantize_rowwise(w, bits, max_trim=0)
    assert bool((_sq_err(greedy, w) <= _sq_err(minmax, w) * (1 + 1e-5) + 1e-12).all())


def test_greedy_shrink_helps_rows_with_outliers():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=g)
    w[:, :2] *= 6
    gain = _sq_err(quantize_rowwise(w, 4), w).sum() / _sq_err(quantize_rowwise(w, 4, max_trim=0), w).sum()
    assert gain < 0.95  # the trim is capped at 16% of the range, far from the 6x outliers


@pytest.mark.parametrize("bits", [8, 4])
def test_rowwise_tables_lower_to_the_rowwise_gather(bits):
    model = _model(tied=False)
    ids = torch.randint(0, V, (3, 16))
    q = qgraph.quantize(model, (ids,), target="generic", progress=False,
                        pipeline=f"annotate{{act_bits=0}},embedding-rowwise{{bits={bits}}},quantize-weights,insert-fq,"
                                 "lower-embedding")
    sim = q.artifacts["simulation"]
    (node,) = [n for n in sim.gm.graph.nodes if isinstance(n.meta.get(QWEIGHT_KEY), UniformWeight)
               and n.meta[QWEIGHT_KEY].spec == rowwise_spec(bits)]
    qw = node.meta[QWEIGHT_KEY]
    assert qw.scale.shape == (V,) and qw.zero_point.shape == (V,)
    assert [m for m in q.gm.modules() if type(m).__name__ == "RowwiseQuantizedEmbedding"]
    torch.testing.assert_close(q(ids), sim(ids), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ref = model(ids)
    assert float((q(ids) - ref).abs().max() / ref.abs().max()) < {8: 0.02, 4: 0.3}[bits]


def test_tied_head_shares_the_quantized_table():
    model = _model(tied=True)
    ids = torch.randint(0, V, (2, 8))
    q = qgraph.quantize(model, (ids,), target="generic", progress=False,
                        pipeline="annotate{act_bits=0,skip=[head]},embedding-rowwise{bits=8,tied=true},"
                                 "quantize-weights,insert-fq")
    assert q.report["stats"]["embedding-rowwise"] == {"tables": 1, "tied": 1}
    qws = [n.meta[QWEIGHT_KEY] for n in q.gm.graph.nodes if QWEIGHT_KEY in n.meta]
    assert len(qws) == 2 and qws[0] is qws[1]
    params = [q.graph.param(n, "weight") for n in q.gm.graph.nodes if QWEIGHT_KEY in n.meta]
    torch.testing.assert_close(params[0], params[1])
    torch.testing.assert_close(params[0], qws[0].dequantize())


def test_bits_option_is_checked():
    model = _model()
    with pytest.raises(PipelineError, match="option 'bits' must be 4 or 8"):
        qgraph.quantize(model, (torch.randint(0, V, (2, 4)),), progress=False,
                        pipeline="annotate{act_bits=0},embedding-rowwise{bits=3}")


# --- bits by frequency --------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(1.2, 3.8))
def test_allocation_meets_the_budget_and_beats_uniform_bits(seed, avg):
    g = torch.Generator().manual_seed(seed)
    bits = (1, 2, 3, 4)
    base = torch.rand(50, 1, generator=g) + 0.1
    errors = base * torch.tensor([1.0, 0.3, 0.08, 0.02]) * (1 + 0.2 * torch.rand(50, 4, generator=g))
    counts = torch.randint(0, 100, (50,), generator=g).double() ** 2
    choice = allocate_bits(counts, errors, bits, avg)
    b = torch.tensor(bits, dtype=torch.float64)[choice]
    assert float(b.mean()) <= avg + 1e-9
    weight = counts + 1.0
    obj = float((weight * errors.double().gather(1, choice[:, None])[:, 0]).sum())
    flat = int(avg) - 1  # everyone at floor(avg) bits is feasible
    assert obj <= float((weight * errors.double()[:, flat]).sum()) + 1e-9


def test_equal_rows_get_bits_in_order_of_frequency():
    errors = torch.tensor([[1.0, 0.3, 0.1, 0.03]]).repeat(6, 1)
    counts = torch.tensor([0.0, 1, 5, 20, 80, 300])
    b = torch.tensor([1, 2, 3, 4])[allocate_bits(counts, errors, (1, 2, 3, 4), 2.5)]
    assert b.tolist() == sorted(b.tolist()) and b[0] < b[-1]


def test_bits_by_frequency_pass_counts_calibration_tokens():
    model = _model(tied=False)
    calib = _zipf_calib()
    q = qgraph.quantize(model, calib[0], calib=calib, target="generic", progress=False,
                        pipeline="annotate{act_bits=0,skip=[head]},embedding-bits-by-frequency{avg_bits=2.0},"
                                 "quantize-weights,insert-fq")
    (node,) = [n for n in q.gm.graph.nodes if isinstance(n.meta.get(QWEIGHT_KEY), MixedBitsBCQWeight)]
    qw = node.meta[QWEIGHT_KEY]
    assert qw.shape == (V, D) and qw.mean_bits <= 2.0 + 1e-9
    w = model.emb.weight.detach()
    torch.testing.assert_close(q.graph.param(node, "weight"), qw.dequantize())
    counts = torch.bincount(torch.cat([b[0].reshape(-1) for b in calib]), minlength=V)
    frequent, rare = counts.argsort(descending=True)[:10], (counts == 0).nonzero().squeeze(1)
    assert qw.row_bits[frequent].float().mean() > qw.row_bits[rare].float().mean() + 1
    summary = q.report["embedding-bits-by-frequency"]["emb"]
    assert summary["token_share_per_bits"][4] + summary["token_share_per_bits"][3] > 0.5
    # stored at its mean bits: planes + α per row + one byte per row
    assert qw.nbytes < V * D * 2.0 / 8 + V * (4 * 4 + 1) + 64
    # frequent tokens are represented better than with the same average bits spread evenly
    err = (qw.dequantize() - w).square().sum(1)
    from qgraph.quant.bcq import quantize_bcq

    even = (quantize_bcq(w, 2, method="alternating").dequantize() - w).square().sum(1)
    assert float((counts * err).sum()) < float((counts * even).sum())


def test_bits_by_frequency_needs_counts_or_calibration():
    model = _model(tied=False)
    ids = torch.randint(0, V, (2, 8))
    with pytest.raises(CalibrationError, match="counts tokens"):
        qgraph.quantize(model, (ids,), progress=False,
                        pipeline="annotate{act_bits=0,skip=[head]},embedding-bits-by-frequency")
    counts = torch.zeros(V)
    counts[:5] = 100
    graph = trace(model, (ids,))
    ctx = PassContext(config={"progress": False, "token_counts": counts})
    PassManager("annotate{act_bits=0,skip=[head]},embedding-bits-by-frequency{avg_bits=1.5}").run(graph, ctx)
    qw = next(graph.meta(n)[QWEIGHT_KEY] for n in graph.nodes() if QWEIGHT_KEY in graph.meta(n))
    assert qw.row_bits[:5].tolist() == [4] * 5 and qw.mean_bits <= 1.5
    ctx = PassContext(config={"progress": False, "token_counts": counts[:10]})
    with pytest.raises(CalibrationError, match="token_counts has 10 entries"):
        PassManager("annotate{act_bits=0,skip=[head]},embedding-bits-by-frequency").run(trace(model, (ids,)), ctx)
