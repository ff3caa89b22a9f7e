"""SPARQ numerics: the bSPARQ window keeps the leading one and stays within its error bound, values that fit
pass unchanged, vSPARQ gives a value 2n bits when its partner is zero, and the fake-quant form stays on the
b-bit grid of the plain fake quantization."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.errors import SpecError
from qgraph.quant.sparq import leading_one, sparq_fake_quantize, vsparq, window

codes = st.lists(st.integers(0, 255), min_size=1, max_size=64)
signed_codes = st.lists(st.integers(-128, 127), min_size=1, max_size=64)


@settings(max_examples=60, deadline=None)
@given(codes, st.integers(1, 7))
def test_truncating_window_keeps_the_leading_one_and_n_bits(values, n):
    v = torch.tensor(values, dtype=torch.float32)
    out = window(v, n)
    msb = leading_one(v)
    shift = (msb - n + 1).clamp_min(0)
    unit = torch.ldexp(torch.ones_like(v), shift)
    assert torch.equal(leading_one(out), msb)  # the leading one survives
    assert torch.equal(out, torch.floor(out / unit) * unit)  # nothing below the window
    assert bool((out / unit < 2**n).all())  # at most n bits in the window
    assert bool((v - out >= 0).all()) and bool((v - out < unit).all())  # error < 2^(msb - n + 1)
    fits = v < 2**n
    assert torch.equal(out[fits], v[fits])


@settings(max_examples=60, deadline=None)
@given(signed_codes, st.integers(1, 6))
def test_rounding_window_halves_the_bound_and_respects_the_range(values, n):
    v = torch.tensor(values, dtype=torch.float32)
    out = window(v, n, rounding=True, lo=-128, hi=127)
    shift = (leading_one(v.abs()) - n + 1).clamp_min(0)
    unit = torch.ldexp(torch.ones_like(v), shift)
    err = (out - v).abs()
    assert bool((err < unit).all())
    inside = (torch.floor(v.abs() / unit + 0.5) * unit) <= torch.where(v >= 0, 127.0, 128.0)
    assert bool((err[inside] <= unit[inside] / 2).all())
    assert bool((out >= -128).all()) and bool((out <= 127).all())
    assert torch.equal(torch.sign(out[out != 0]), torch.sign(v[out != 0]))
    small = v.abs() < 2**n
    assert torch.equal(out[small], v[small])


def test_window_examples():
    v = torch.tensor([0.0, 5.0, 15.0, 16.0, 23.0, 200.0, 255.0, -77.0])
    # 23 = 10111b -> window 1011b at shift 1 -> 22; 200 = 11001000b -> 1100b << 4 = 192; 255 -> 240
    assert window(v, 4).tolist() == [0.0, 5.0, 15.0, 16.0, 22.0, 192.0, 240.0, -72.0]
    # rounding: 23 -> 24, 200 -> 208, 255 -> 256 is out of [0, 255]: truncated to 240
    assert window(v, 4, rounding=True, lo=-255, hi=255).tolist() == [0.0, 5.0, 15.0, 16.0, 24.0, 208.0, 240.0,
                                                                        -80.0]


def test_restricted_placements():
    v = torch.tensor([23.0, 100.0, 255.0])
    out = window(v, 4, shifts=(0, 2, 4))
    # 23 needs shift 1 -> placement 2: 10100b = 20; 100 (msb 6) needs shift 3 -> 4: 96; 255 -> shift 4: 240
    assert out.tolist() == [20.0, 96.0, 240.0]
    with pytest.raises(SpecError, match="placement"):
        window(v, 4, shifts=(0, 2))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=2, max_size=40), st.integers(2, 4))
def test_vsparq_pairs(values, n):
    v = torch.tensor(values, dtype=torch.float32)
    out = vsparq(v, n)
    narrow, wide = window(v, n), window(v, 2 * n)
    size = v.numel()
    for i in range(size):
        j = i ^ 1
        if j < size and v[j] == 0:
            assert out[i] == wide[i]
            if 2 * n >= 8:
                assert out[i] == v[i]  # exact: the partner's bits are free
        else:
            assert out[i] == narrow[i]


def test_vsparq_pairs_along_a_dim():
    v = torch.tensor([[200.0, 0.0], [200.0, 3.0]])  # pairs run along dim 1 (columns 0 and 1)
    assert vsparq(v, 4, dim=1).tolist() == [[200.0, 0.0], [192.0, 3.0]]
    assert vsparq(v, 4, dim=0).tolist() == [[192.0, 0.0], [192.0, 3.0]]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["bsparq", "vsparq"]), st.booleans())
def test_fake_quantize_stays_on_the_grid(seed, mode, rounding):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(4, 6, 3, generator=g) * 3)
    scale, zp = 0.05, 0
    plain = torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)
    out = sparq_fake_quantize(x, scale, zp, 0, 255, 4, mode, rounding, 1)
    v, got = torch.round(plain / scale), torch.round(out / scale)
    torch.testing.assert_close(out, got * scale, rtol=0, atol=1e-6)  # on the 8-bit grid
    assert bool((got >= 0).all()) and bool((got <= 255).all())
    fits = v < 16
    assert torch.equal(out[fits], plain[fits])  # bit-identical where the codes fit the window
    assert bool(((got - v).abs() < torch.ldexp(torch.ones_like(v), (leading_one(v) - 3).clamp_min(0))).all())


def test_bad_arguments_are_spec_errors():
    with pytest.raises(SpecError, match="bits"):
        window(torch.ones(3), 0)
    with pytest.raises(SpecError, match="mode"):
        sparq_fake_quantize(torch.ones(3), 0.1, 0, 0, 255, 4, "xsparq")
