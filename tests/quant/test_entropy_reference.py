"""The entropy observer against TensorRT's entropy calibration as its slides document it (GTC 2017, "8-bit
Inference with TensorRT"), written here as the literal loop: for each threshold bin i, P = |x| histogram's
first i bins with the outlier mass added to bin i-1; Q = those i bins merged into 2^(bits-1) levels and
spread evenly over the bins that are non-empty; KL(P||Q) by scipy; the least KL wins. The slides do not fix
how i bins split into the levels; both sides here use equal spans (bin b goes to level floor(b·levels/i)).
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import entropy

from qgraph.quant.observers import EntropyObserver
from qgraph.quant.qspec import QSpec


def tensorrt_kl(h: np.ndarray, levels: int) -> dict[int, float]:
    """KL(P||Q) per threshold bin i in [levels, len(h)] (inf where Q misses mass P has)."""
    out = {}
    for i in range(levels, len(h) + 1):
        p = h[:i].astype(np.float64).copy()
        p[i - 1] += h[i:].sum()
        q = np.zeros(i)
        level = np.arange(i) * levels // i
        for lev in range(levels):
            span = level == lev
            nonzero = span & (h[:i] > 0)
            if nonzero.any():
                q[nonzero] = h[:i][span].sum() / nonzero.sum()
        out[i] = np.inf if np.any((p > 0) & (q == 0)) else float(entropy(p, q))
    return out


def _observer_on(counts: np.ndarray) -> EntropyObserver:
    """An entropy observer whose |x| histogram is ``counts`` (one value at each bin's centre, per count)."""
    n = len(counts)
    obs = EntropyObserver(bins=2 * n, amax=float(n))  # bin width 1 on [-n, n]
    centres = np.repeat(np.arange(n) + 0.5, counts.astype(np.int64))
    obs.observe(torch.from_numpy(centres).float())
    return obs


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([4, 5, 6]), st.integers(20, 80).map(lambda k: 2 * k),
       st.floats(1.2, 12.0))
def test_threshold_equals_tensorrt_reference(seed, bits, n, df):
    """Same histogram, same threshold: the observer's choice is the reference's arg-min bin (tolerance: 0 bins;
    on an exact KL tie, any tied bin, i.e. the reference KL at our bin within 1e-9 of its minimum)."""
    levels = 1 << (bits - 1)
    rng = np.random.default_rng(seed)
    x = np.abs(rng.standard_t(df, size=5000))
    counts, _ = np.histogram(x, bins=n, range=(0.0, float(x.max())))
    counts[0] += 1  # bin 0 non-empty, as for any real activation
    obs = _observer_on(counts)
    t = float(obs.range(QSpec(bits=bits))[1])
    ref = tensorrt_kl(counts, levels)
    last = int(np.flatnonzero(counts)[-1]) + 1
    ref = {i: v for i, v in ref.items() if i <= last}  # past the last non-empty bin nothing changes
    best = min(ref, key=ref.get)
    ours = round(t)  # threshold in bins (bin width 1)
    assert ours == best or ref[ours] <= ref[best] + 1e-9


@pytest.mark.parametrize("bits", [7, 8])
def test_reference_and_observer_agree_on_a_real_shape(bits):
    """A half-normal with a far outlier tail (a post-ReLU activation): same bin as the reference."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, generator=g).abs()
    x[:20] *= 8
    counts, _ = np.histogram(x.numpy(), bins=400, range=(0.0, float(x.max())))
    ref = tensorrt_kl(counts, 1 << (bits - 1))
    best = min(ref, key=ref.get)
    t = float(_observer_on(counts).range(QSpec(bits=bits))[1])
    assert round(t) == best
    assert best < 0.6 * 400  # the outliers are clipped
