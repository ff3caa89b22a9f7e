"""`qgraph.quant.block_scaled`: the K-quant-style grid (codes, scale codes, row scales), its exact BCQ form, GPTQ and
aespa on a fixed grid, storage round trips and bad input."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.errors import SpecError
from qgraph.quant import block_scaled as bs
from qgraph.quant.aespa import level_grid, refine_rounding
from qgraph.quant.gptq import gptq, output_error, round_to_nearest
from qgraph.quant.qspec import QSpec


def spec(bits=4, gs=32, sb=6):
    return QSpec.uniform(bits, signed=False, symmetric=False, granularity="group", group_size=gs, scale_bits=sb)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), groups=st.integers(1, 4), gs=st.sampled_from([8, 32, 64]), bits=st.integers(2, 4),
       sb=st.integers(4, 8), seed=st.integers(0, 2**16))
def test_grid_error_is_bounded_and_bcq_form_is_exact(m, groups, gs, bits, sb, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, groups * gs, generator=g) * torch.rand(m, 1, generator=g) * 3
    q = bs.quantize(w, spec(bits, gs, sb))
    assert q.codes.max() <= 2**bits - 1 and q.scale_codes.max() <= 2**sb - 1 and q.min_codes.max() <= 2**sb - 1
    w_hat = q.dequantize()
    # half a step, plus the range lost to coding d and m (rounded, then moved by at most one code: 1.5 codes)
    d, mn = q.scales()
    coded = 1.5 * (q.super_scale.float()[:, None] * (2**bits - 1) + q.super_min.float()[:, None])
    bound = (d / 2 + coded).repeat_interleave(gs, 1) * 1.01 + 1e-6
    assert bool(((w_hat - w).abs() <= bound).all())
    assert torch.allclose(q.to_bcq().dequantize(), w_hat, rtol=0, atol=1e-5 * float(w.abs().max()) + 1e-7)


def test_a_q4_1_grid_is_kept_exactly_without_scale_rounding():
    """Weights on a 4-bit grid with a float min per group of 32 (a Q4_1 file's) come back exactly when the scale
    codes can hold the grid (here: every group has the same d and m)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (8, 64), generator=g)
    codes[:, 0], codes[:, 1] = 0, 15  # each group's min and max are on the grid
    codes[:, 32], codes[:, 33] = 0, 15
    d, m = 63 * 2.0**-11, 63 * 2.0**-8  # row scales d / 63 and m / 63 are exact in fp16
    w = codes.float() * d - m
    q = bs.quantize(w, spec())
    assert torch.equal(q.dequantize(), w)


def test_bits_per_weight_count_codes_scale_codes_and_row_scales():
    q = bs.quantize(torch.randn(64, 576), spec())
    assert q.nbytes == 64 * 576 // 2 + 64 * 18 * 12 // 8 + 64 * 4
    assert abs(q.nbytes * 8 / q.codes.numel() - 4.4306) < 1e-3
    assert q.nbytes == sum(t.numel() * t.element_size() for t in q.tensors().values())


@pytest.mark.parametrize("sb, k", [(6, 96), (5, 160), (8, 96)])
def test_storage_round_trip_and_rows_cat(sb, k):
    q = bs.quantize(torch.randn(48, k), spec(3, sb=sb))
    assert q.nbytes == sum(t.numel() * t.element_size() for t in q.tensors().values())
    back = bs.BlockScaledWeight.from_tensors(q.spec, q.shape, q.tensors("x."), "x.")
    for name in ("codes", "scale_codes", "min_codes", "super_scale", "super_min"):
        assert torch.equal(getattr(back, name), getattr(q, name))
    parts = [q.rows(slice(0, 16)), q.rows(slice(16, 48))]
    assert torch.equal(bs.BlockScaledWeight.cat(parts).dequantize(), q.dequantize())


def test_gptq_on_the_fixed_grid_beats_round_to_nearest():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    w = torch.randn(32, 64, generator=g)
    h = 2 * x.T.double() @ x.double() / x.shape[0]
    rtn = round_to_nearest(w, spec())
    res = gptq(w, h, spec(), act_order=True)
    assert isinstance(res.qweight, bs.BlockScaledWeight)
    # same grid (fitted with the Hessian diagonal as importance), codes chosen by GPTQ
    assert res.error < 0.8 * output_error(w.double(), rtn.dequantize(), h)


def test_aespa_refinement_keeps_the_grid_and_never_gets_worse():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 32, generator=g)
    w = torch.randn(16, 32, generator=g)
    h = 2 * x.T.double() @ x.double() / x.shape[0]
    q = round_to_nearest(w, spec())
    grid = level_grid(q)
    assert torch.equal(grid.to_qweight().codes, q.codes)
    r = refine_rounding(w, q, h)
    assert isinstance(r.qweight, bs.BlockScaledWeight)
    assert torch.equal(r.qweight.scale_codes, q.scale_codes) and torch.equal(r.qweight.super_min, q.super_min)
    assert r.loss <= r.loss_init + 1e-9


@pytest.mark.parametrize("kw, match", [
    (dict(symmetric=True), "unsigned asymmetric"),
    (dict(granularity="channel", group_size=None), "per-group"),
    (dict(scale_bits=9), "2..8"),
])
def test_bad_specs_are_refused(kw, match):
    base = dict(signed=False, symmetric=False, granularity="group", group_size=32, scale_bits=6)
    base.update(kw)
    with pytest.raises(SpecError, match=match):
        QSpec.uniform(4, **base)


def test_spec_text_round_trips():
    s = spec()
    assert str(s) == "uint4/g32/asym/sb=6" and QSpec.parse(str(s)) == s and QSpec.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("sb", [6, 8])
def test_graph_artifact_entries_round_trip(sb):
    from qgraph.quant.qweight_io import qweight_from_parts, qweight_parts, tensor_names

    q = bs.quantize(torch.randn(40, 64), spec(sb=sb))
    entry, tensors = qweight_parts(q, "layer.")
    assert tensor_names(entry) == set(tensors)
    back = qweight_from_parts(entry, tensors)
    assert torch.equal(back.dequantize(), q.dequantize())
    tensors["layer.super_scale"] = torch.full_like(q.super_scale, float("nan"))
    with pytest.raises(SpecError, match="NaN"):
        qweight_from_parts(entry, tensors)
