import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.errors import SpecError
from qgraph.quant.qspec import QSpec
from qgraph.quant.uniform import (
    compute_qparams,
    dequantize,
    fake_quantize,
    min_max,
    quantize,
    quantize_weight,
    reduced_shape,
)


@st.composite
def tensor_and_spec(draw):
    gran = draw(st.sampled_from(["tensor", "channel", "group"]))
    rows = draw(st.integers(1, 6))
    groups = draw(st.integers(1, 4))
    gs = draw(st.sampled_from([1, 3, 8, 16]))
    shape = (rows, groups * gs)
    axis = draw(st.sampled_from([0, 1, -1])) if gran == "channel" else 0
    spec = QSpec(
        bits=draw(st.integers(2, 8)),
        signed=draw(st.booleans()),
        symmetric=draw(st.booleans()),
        granularity=gran,
        axis=axis,
        group_size=gs if gran == "group" else None,
        pow2_scale=draw(st.booleans()),
    )
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 100.0]))
    shift = draw(st.sampled_from([0.0, 0.5, 3.0]))
    x = (torch.randn(shape, generator=g) + shift) * scale
    return x, spec


def _expand(p, x, spec):
    """Reference broadcast of reduced-shape params to x, written independently of the module."""
    if spec.granularity == "tensor":
        return p.expand(x.shape)
    if spec.granularity == "channel":
        shape = [1] * x.dim()
        shape[spec.axis] = -1
        return p.reshape(shape).expand(x.shape)
    return p.repeat_interleave(spec.group_size, dim=1).reshape(x.shape)


@settings(max_examples=60, deadline=None)
@given(tensor_and_spec())
def test_round_trip_error_at_most_half_a_step_inside_clip_range(case):
    x, spec = case
    scale, zp = compute_qparams(*min_max(x, spec), spec)
    assert tuple(scale.shape) == reduced_shape(x.shape, spec) == tuple(zp.shape)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert (scale > 0).all()
    if spec.pow2_scale:
        assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)
    s, z = _expand(scale, x, spec), _expand(zp, x, spec).float()
    lo, hi = s * (spec.qmin - z), s * (spec.qmax - z)
    inside = (x >= lo) & (x <= hi)
    err = (fake_quantize(x, scale, zp, spec) - x).abs()
    bound = s / 2 * (1 + 1e-5) + 1e-6 * x.abs()
    assert (err[inside] <= bound[inside]).all()
    # the observed range itself is covered (negative values only when the spec can hold them)
    covered = x >= 0 if (spec.symmetric and not spec.signed) else torch.ones_like(x, dtype=torch.bool)
    assert (err[covered] <= bound[covered]).all()


@settings(max_examples=40, deadline=None)
@given(tensor_and_spec())
def test_quantize_codes_and_dequantize_agree_with_fake_quantize(case):
    x, spec = case
    scale, zp = compute_qparams(*min_max(x, spec), spec)
    q = quantize(x, scale, zp, spec)
    assert q.dtype == (torch.int8 if spec.signed else torch.uint8)
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    assert torch.equal(dequantize(q, scale, zp, spec), fake_quantize(x, scale, zp, spec))


def test_qparams_formulas():
    s, z = compute_qparams(torch.tensor(-2.0), torch.tensor(1.0), QSpec())
    assert s.item() == pytest.approx(2.0 / 127.5) and z.item() == 0
    s, z = compute_qparams(-1.0, 3.0, QSpec(signed=False, symmetric=False))
    assert s.item() == pytest.approx(4.0 / 255) and z.item() == round(1.0 / (4.0 / 255))
    s, z = compute_qparams(0.5, 3.0, QSpec(signed=False, symmetric=False))  # range widened to include 0
    assert s.item() == pytest.approx(3.0 / 255) and z.item() == 0
    s, z = compute_qparams(-1.0, 3.0, QSpec(signed=False, symmetric=True))
    assert s.item() == pytest.approx(3.0 / 255) and z.item() == 0
    s, z = compute_qparams(-1.0, 3.0, QSpec(bits=4, symmetric=False))
    assert s.item() == pytest.approx(4.0 / 15) and z.item() == -8 + round(1.0 / (4.0 / 15))
    s, _ = compute_qparams(-1.0, 3.0, QSpec(pow2_scale=True))
    assert s.item() == 2.0**-5  # 3/127.5 = 0.0235 → rounded up to 1/32
    s, z = compute_qparams(0.0, 0.0, QSpec())  # all-zero tensor: no division by zero
    assert s.item() > 0 and torch.equal(fake_quantize(torch.zeros(3), s, z, QSpec()), torch.zeros(3))
    with pytest.raises(SpecError, match="non-finite"):
        compute_qparams(float("nan"), 1.0, QSpec())
    with pytest.raises(SpecError, match="bcq"):
        compute_qparams(-1.0, 1.0, QSpec.bcq(3))


@pytest.mark.parametrize("signed,symmetric,qrange", [(True, True, (-128, 127)), (False, False, (0, 255)),
                                                    (True, False, (-128, 127))])
def test_int8_matches_torch_fake_quantize_except_exact_ties(signed, symmetric, qrange):
    torch.manual_seed(0)
    x = torch.randn(64, 256) * 2
    spec = QSpec(signed=signed, symmetric=symmetric)
    s, z = compute_qparams(*min_max(x, spec), spec)
    ref = torch.fake_quantize_per_tensor_affine(x, s, z, *qrange)
    diff = (fake_quantize(x, s, z, spec) - ref).abs()
    # torch multiplies by 1/scale, we divide (as ONNX QuantizeLinear): only exact .5 ties may differ
    assert int((diff > 0).sum()) <= 2 and float(diff.max()) <= float(s) * 1.0001
    cspec = spec.replace(granularity="channel")
    s, z = compute_qparams(*min_max(x, cspec), cspec)
    ref = torch.fake_quantize_per_channel_affine(x, s, z, 0, *qrange)
    diff = (fake_quantize(x, s, z, cspec) - ref).abs()
    assert int((diff > 0).sum()) <= x.shape[0] and float(diff.max()) <= float(s.max()) * 1.0001


def test_group_scales_run_along_in_features():
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    spec = QSpec.uniform(4, granularity="group", group_size=16)
    q, s, z = quantize_weight(w, spec)
    assert q.shape == w.shape and s.shape == (8, 4) and z.shape == (8, 4)
    amax = w.reshape(8, 4, 16).abs().amax(-1)
    assert torch.allclose(s, amax / 7.5)
    # channel axis 1 of a [out, in] weight gives one scale per input column
    cspec = QSpec(granularity="channel", axis=1)
    _, s1, _ = quantize_weight(w, cspec)
    assert torch.allclose(s1, w.abs().amax(0) / 127.5)
    # group on a conv weight [O, I, kh, kw]: rows are output channels, groups over I*kh*kw
    wc = torch.randn(4, 8, 3, 3)
    gspec = QSpec.uniform(8, granularity="group", group_size=24)
    qc, sc, _ = quantize_weight(wc, gspec)
    assert sc.shape == (4, 3) and qc.shape == wc.shape
    assert torch.allclose(sc, wc.reshape(4, 3, 24).abs().amax(-1) / 127.5)


def test_clip_search_lowers_lp_error():
    torch.manual_seed(2)
    w = torch.randn(32, 256)
    w[:, :3] *= 12  # outliers make min/max ranges wasteful at 4 bits
    spec = QSpec.uniform(4, granularity="channel")
    for clip in (False, True):
        q, s, z = quantize_weight(w, spec, clip_search=clip)
        err = (dequantize(q, s, z, spec) - w).abs().pow(2.4).sum(1)
        if not clip:
            base = err
    assert (err <= base * (1 + 1e-6)).all() and err.sum() < 0.9 * base.sum()
    q, s, z = quantize_weight(w, QSpec.uniform(4, symmetric=False, granularity="group", group_size=32),
                              clip_search=True, steps=20)
    assert s.shape == (32, 8)


def test_shape_and_spec_errors():
    x = torch.randn(4, 8)
    with pytest.raises(SpecError, match="per-channel qparams"):
        fake_quantize(x, torch.ones(3), torch.zeros(3, dtype=torch.int32), QSpec(granularity="channel"))
    with pytest.raises(SpecError, match="grouped qparams"):
        spec = QSpec.uniform(4, granularity="group", group_size=4)
        fake_quantize(x, torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.int32), spec)
    with pytest.raises(SpecError, match="divide"):
        quantize_weight(x, QSpec.uniform(4, granularity="group", group_size=3))
    with pytest.raises(SpecError, match="one value"):
        quantize(x, torch.ones(2), torch.zeros(2, dtype=torch.int32), QSpec())
    with pytest.raises(SpecError, match="bcq"):
        quantize_weight(x, QSpec.bcq(3))


def test_fake_quantize_keeps_dtype_and_low_bit_levels():
    x = torch.linspace(-1, 1, 101, dtype=torch.float16)
    spec = QSpec(bits=2)
    s, z = compute_qparams(*min_max(x, spec), spec)
    y = fake_quantize(x, s, z, spec)
    assert y.dtype == torch.float16
    assert len(torch.unique(y)) == 4  # int2: codes -2..1
    assert math.isclose(float(s), 1 / 1.5, rel_tol=1e-6)
