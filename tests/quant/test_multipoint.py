"""Multipoint numerics: more points never raise the error (per element), one point is round-to-nearest,
greedy allocation follows the largest errors within the budget, and the weight type round-trips."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.errors import SpecError
from qgraph.passes.quantize_weights import quantize_tensor
from qgraph.quant.multipoint import MultipointWeight, fit_point, greedy_counts, residual_points
from qgraph.quant.qspec import QSpec

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = [QSpec.uniform(3, granularity="channel"), QSpec.uniform(4, granularity="group", group_size=8),
         QSpec.uniform(2, granularity="tensor"), QSpec.uniform(4, granularity="channel", symmetric=False)]


def _weight(seed, rows, cols):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    w[0, 0] = 6.0  # an outlier: a wide first range
    return w


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 12), st.sampled_from([8, 16, 24]), st.integers(0, len(SPECS) - 1),
       st.integers(0, 1))
def test_error_is_non_increasing_in_points_and_below_rtn(seed, rows, cols, which, axis):
    spec = SPECS[which].replace(axis=axis) if SPECS[which].granularity != "tensor" else SPECS[which]
    w = _weight(seed, rows, cols)
    if spec.granularity == "group" and axis == 1:
        spec = spec.replace(group_size=rows) if rows % 2 == 0 else spec.replace(granularity="channel",
                                                                                group_size=None)
    base = quantize_tensor(w, spec)
    rtn_err = (base.dequantize().reshape(w.shape) - w).abs()
    points = residual_points(w, base, axis, 3)
    prev = rtn_err
    c = w.shape[axis]
    for k in range(4):
        q = MultipointWeight.build(base, points, torch.full((c,), k), axis)
        err = (q.dequantize() - w).abs()
        assert bool((err <= prev + 1e-6).all()), k  # per element, so also per row and in total
        prev = err
    assert float(prev.norm()) < 0.5 * float(rtn_err.norm()) + 1e-6  # three extra points cut the error a lot


def test_one_point_is_round_to_nearest_and_counts_pick_rows():
    w = _weight(0, 6, 16)
    spec = QSpec.uniform(3, granularity="channel")
    base = quantize_tensor(w, spec)
    points = residual_points(w, base, 0, 2)
    none = MultipointWeight.build(base, points, torch.zeros(6, dtype=torch.int64), 0)
    assert torch.equal(none.dequantize(), base.dequantize())
    assert none.codes == () and none.nbytes == base.nbytes + 6
    counts = torch.tensor([0, 2, 0, 1, 0, 0])
    q = MultipointWeight.build(base, points, counts, 0)
    d = q.dequantize()
    for r in range(6):
        ref = base.dequantize()[r] + sum(points[j][1][r] * points[j][0][r].float() for j in range(int(counts[r])))
        torch.testing.assert_close(d[r], ref, rtol=0, atol=1e-6)
    assert [t.shape[0] for t in q.codes] == [2, 1]
    # 3-bit codes packed: 2 rows x 16 + 1 row x 16 codes, fp32 scales, one count byte per row
    assert q.nbytes == base.nbytes + (32 * 3 + 7) // 8 + 8 + (16 * 3 + 7) // 8 + 4 + 6
    assert q.points().tolist() == [1, 3, 1, 2, 1, 1]


def test_fit_point_is_close_to_the_best_scale():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(4, 64, generator=g)
    r[:, 0] = 8.0
    codes, scale = fit_point(r, 3)
    e_fit = (r - scale[:, None] * codes.float()).square().sum(1)

    def err(s):
        return (r - s[:, None] * torch.clamp(torch.round(r / s[:, None]), -4, 3)).square().sum(1)

    grid = torch.stack([err(r.abs().amax(1) * t / 3.5) for t in torch.linspace(0.05, 1.0, 400)])
    assert bool((e_fit <= 1.02 * grid.min(0).values).all())
    assert float(e_fit.sum()) < 0.9 * float(grid[-1].sum())  # the unclipped max scale is worse


def test_greedy_counts_follow_the_largest_error_within_budget():
    errors = torch.tensor([[9.0, 1.0, 5.0, 4.0],
                           [3.0, 0.5, 4.5, 1.0],
                           [2.9, 0.4, 1.0, 0.9]])
    # 9 -> ch0 (now 3), 5 -> ch2 (now 4.5), 4.5 -> ch2 (now 1.0, done), 4 -> ch3
    assert greedy_counts(errors, 4).tolist() == [1, 0, 2, 1]
    assert greedy_counts(errors, 0).tolist() == [0, 0, 0, 0]
    assert int(greedy_counts(errors, 100).sum()) == 8
    worse = torch.tensor([[2.0, 1.0], [3.0, 0.5]])  # ch0's next point would raise its error: skipped
    assert greedy_counts(worse, 2).tolist() == [0, 1]


def test_parts_round_trip_and_typed_errors():
    w = _weight(3, 8, 16)
    base = quantize_tensor(w, QSpec.uniform(4, granularity="channel", axis=1))
    points = residual_points(w, base, 1, 2)
    q = MultipointWeight.build(base, points, torch.tensor([2, 0, 1] + [0] * 13), 1)
    back = MultipointWeight.from_parts(q.manifest(), q.tensors("n1."), prefix="n1.")
    assert torch.equal(back.dequantize(), q.dequantize())
    with pytest.raises(SpecError, match="counts"):
        MultipointWeight(base, torch.zeros(3, dtype=torch.uint8), (), (), 1)
    with pytest.raises(SpecError, match="point 2"):
        MultipointWeight(base, q.counts, (q.codes[0][:1], q.codes[1]), q.scales, 1)
    with pytest.raises(SpecError, match="missing"):
        MultipointWeight.from_parts(q.manifest(), {}, prefix="n1.")
