"""GPTQ numerics: beats round-to-nearest on correlated inputs, respects groups, act-order and block invariance.

Measured on 60 random problems (M 4..32, K 16..64, N = 4K correlated inputs), ratio of GPTQ's output error
tr((W−Ŵ)H(W−Ŵ)ᵀ) to round-to-nearest's: uniform int4 per-channel median 0.49 (max 0.62), int3 g16 median
0.54 (max 0.84), int2 g16 median 0.60 (max 0.94); BCQ 2-3 bits median 0.55-0.60 (max 1.05: with tiny
16-column groups a single α fit per group can lose to 15 alternating rounds). Hence the bounds below:
uniform ≤ 1.0 × RTN always, BCQ ≤ 1.1 × RTN, and a median ≤ 0.75.
"""
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.errors import SpecError
from qgraph.quant import uniform
from qgraph.quant.bcq import quantize_bcq_spec
from qgraph.quant.bcq_weight import BCQWeight
from qgraph.quant.gptq import HessianAccumulator, gptq, hessian, output_error, rtn_error
from qgraph.quant.qspec import QSpec
from qgraph.quant.qtensor import UniformWeight


def _problem(seed: int, m: int, k: int, n: int | None = None, corr: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    n = n or 4 * k
    mix = torch.eye(k) + corr * torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(n, k, generator=g) @ mix
    w = torch.randn(m, k, generator=g)
    return w, hessian(x)


UNIFORM = [QSpec.uniform(4, granularity="channel"), QSpec.uniform(3, granularity="group", group_size=16, symmetric=False),
           QSpec.uniform(2, granularity="group", group_size=16, symmetric=False), QSpec.uniform(4)]
BCQ = [QSpec.bcq(2, group_size=16), QSpec.bcq(3, method="alternating"), QSpec.bcq(3, group_size=16, bcq_offset=True)]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(4, 24), st.sampled_from([16, 32, 48]), st.sampled_from(UNIFORM + BCQ),
       st.booleans())
def test_gptq_output_error_at_most_rtn(seed, m, k, spec, act_order):
    w, h = _problem(seed, m, k)
    res = gptq(w, h, spec, act_order=act_order, block=16)
    bound = 1.0 if spec.scheme == "uniform" else 1.1
    assert res.error <= bound * rtn_error(w, h, spec) + 1e-9
    assert res.error == pytest.approx(output_error(w, res.w_hat, h), rel=1e-9)


def test_bcq_error_feedback_that_hurts_keeps_round_to_nearest():
    """The example hypothesis found: 3-bit BCQ with an offset under act_order, where GPTQ's sweep gives 1.36x
    the round-to-nearest error; the result is then the round-to-nearest weight."""
    w, h = _problem(5, 4, 16)
    spec = QSpec.bcq(3, group_size=16, bcq_offset=True)
    res = gptq(w, h, spec, act_order=True, block=16)
    assert res.rtn_kept
    assert res.error == pytest.approx(rtn_error(w, h, spec), rel=1e-9)
    assert not gptq(w, h, spec, act_order=False, block=16).rtn_kept  # 3.51 < 3.87 there


def test_gptq_typical_gain_over_rtn():
    ratios = {"uniform": [], "bcq": []}
    for seed in range(6):
        w, h = _problem(seed, 16, 64)
        for spec in (QSpec.uniform(3, granularity="group", group_size=32, symmetric=False), QSpec.bcq(3, group_size=32)):
            ratios[spec.scheme].append(gptq(w, h, spec, act_order=True).error / rtn_error(w, h, spec))
    for scheme, r in ratios.items():
        assert statistics.median(r) <= 0.75, (scheme, r)


@pytest.mark.parametrize("spec", [QSpec.uniform(4), QSpec.uniform(4, granularity="channel"),
                                  QSpec.uniform(3, granularity="group", group_size=8, symmetric=False)])
def test_identity_hessian_is_round_to_nearest(spec):
    """With uncorrelated inputs no error is spread, so GPTQ is exactly RTN (same codes and qparams)."""
    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(1))
    res = gptq(w, torch.eye(32, dtype=torch.float64), spec, damp=0.0)
    codes, scale, zp = uniform.quantize_weight(w, spec)
    assert isinstance(res.qweight, UniformWeight)
    torch.testing.assert_close(res.qweight.scale, scale)
    torch.testing.assert_close(res.qweight.zero_point, zp)
    torch.testing.assert_close(res.w_hat, uniform.dequantize(codes, scale, zp, spec), rtol=0, atol=1e-6)


def test_identity_hessian_bcq_never_worse_than_its_fit():
    spec = QSpec.bcq(3, group_size=8, method="alternating")
    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(2))
    h = torch.eye(32, dtype=torch.float64)
    res = gptq(w, h, spec, damp=0.0)
    assert res.error <= output_error(w, quantize_bcq_spec(w, spec).dequantize(), h) * (1 + 1e-6)


def _block_diag_problem(seed, m, groups, g):
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(groups):
        x = torch.randn(4 * g, g, generator=gen) @ (torch.eye(g) + torch.randn(g, g, generator=gen) / g**0.5)
        blocks.append(hessian(x))
    return torch.randn(m, groups * g, generator=gen), blocks


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", ["uniform", "bcq"])
def test_groups_are_independent_under_block_diagonal_hessian(scheme, act_order):
    """Groups respected: with H block-diagonal on the groups, each group quantizes exactly as if alone."""
    m, groups, g = 10, 3, 8
    w, blocks = _block_diag_problem(3, m, groups, g)
    h = torch.block_diag(*blocks)
    if scheme == "uniform":
        spec, single = (QSpec.uniform(3, granularity="group", group_size=g, symmetric=False),
                        QSpec.uniform(3, granularity="channel", symmetric=False))
    else:
        spec, single = QSpec.bcq(2, group_size=g, method="alternating"), QSpec.bcq(2, method="alternating")
    res = gptq(w, h, spec, damp=0.0, act_order=act_order, block=5)
    parts = [gptq(w[:, i * g:(i + 1) * g], blocks[i], single, damp=0.0, act_order=act_order).w_hat
             for i in range(groups)]
    torch.testing.assert_close(res.w_hat, torch.cat(parts, dim=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("spec", [QSpec.uniform(3, granularity="channel", symmetric=False),
                                  QSpec.bcq(3, method="weighted")])
def test_act_order_equals_gptq_on_permuted_columns(spec):
    w, h = _problem(4, 16, 40)
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    a = gptq(w, h, spec, act_order=True)
    b = gptq(w[:, perm], h[perm][:, perm], spec, act_order=False)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    torch.testing.assert_close(a.w_hat, b.w_hat[:, inv], rtol=0, atol=1e-6)


@pytest.mark.parametrize("spec", [QSpec.uniform(2, granularity="group", group_size=8, symmetric=False),
                                  QSpec.bcq(2, group_size=8)])
def test_block_size_does_not_change_the_result(spec):
    w, h = _problem(5, 8, 48)
    ref = gptq(w, h, spec, block=48, act_order=True).w_hat
    for block in (1, 7, 16):
        torch.testing.assert_close(gptq(w, h, spec, block=block, act_order=True).w_hat, ref, rtol=0, atol=1e-6)


def test_result_has_the_layout_of_quantize_weights():
    w, h = _problem(6, 8, 32)
    for spec in (QSpec.uniform(4), QSpec.uniform(4, granularity="channel"),
                 QSpec.uniform(4, granularity="group", group_size=8, symmetric=False, signed=False)):
        q = gptq(w, h, spec).qweight
        codes, scale, zp = uniform.quantize_weight(w, spec)
        assert isinstance(q, UniformWeight) and q.spec == spec
        assert q.codes.dtype == codes.dtype and q.scale.shape == scale.shape and q.zero_point.shape == zp.shape
        assert int(q.codes.min()) >= spec.qmin and int(q.codes.max()) <= spec.qmax
    spec = QSpec.bcq(3, group_size=8, bcq_offset=True)
    q = gptq(w, h, spec).qweight
    ref = quantize_bcq_spec(w, spec)
    assert isinstance(q, BCQWeight) and q.bits == 3 and q.group_size == 8
    assert q.planes.shape == ref.planes.shape and q.alpha.shape == ref.alpha.shape and q.offset.shape == ref.offset.shape
    assert bool((q.alpha >= 0).all())


def test_bcq_columns_sit_on_their_group_levels():
    w, h = _problem(7, 6, 24)
    q = gptq(w, h, QSpec.bcq(2, group_size=8), act_order=True).qweight
    wh = q.dequantize()
    signs = torch.tensor([[-1, -1], [1, -1], [-1, 1], [1, 1]], dtype=torch.float32)
    for gi in range(3):
        levels = signs @ q.alpha[:, :, gi]  # [4, M]
        cols = wh[:, gi * 8:(gi + 1) * 8]
        dist = (cols[None] - levels[:, :, None]).abs().amin(dim=0)
        assert float(dist.max()) < 1e-6


def test_hessian_accumulates_in_a_stream():
    x = torch.randn(3, 50, 16)
    acc = HessianAccumulator(16)
    for part in x:
        acc.add(part)
    flat = x.reshape(-1, 16)
    torch.testing.assert_close(acc.value(), hessian(flat), rtol=1e-5, atol=1e-6)  # float32 partial products
    torch.testing.assert_close(acc.value(), 2 * flat.double().T @ flat.double() / 150, rtol=1e-5, atol=1e-6)


def test_dead_inputs_and_rank_deficient_hessian():
    w = torch.randn(6, 16)
    x = torch.randn(8, 16)  # N < K: H is singular until damped
    x[:, 3] = 0  # an input that never fires
    res = gptq(w, hessian(x), QSpec.uniform(4, granularity="channel"))
    assert torch.isfinite(res.w_hat).all()
    assert res.error <= rtn_error(w, hessian(x), QSpec.uniform(4, granularity="channel")) + 1e-9


def test_bad_arguments():
    w = torch.randn(4, 8)
    with pytest.raises(SpecError, match="Hessian must be"):
        gptq(w, torch.eye(6), QSpec.uniform(4))
    with pytest.raises(SpecError, match="does not divide"):
        gptq(w, torch.eye(8), QSpec.uniform(4, granularity="group", group_size=3))
    with pytest.raises(SpecError, match="clip_search"):
        gptq(w, torch.eye(8), QSpec.bcq(2), clip_search=True)
    with pytest.raises(SpecError, match="axis 0"):
        gptq(w, torch.eye(8), QSpec.uniform(4, granularity="channel", axis=1))
