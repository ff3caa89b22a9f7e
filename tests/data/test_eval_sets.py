"""Evaluation sets (sizes, determinism, calibration disjoint from evaluation) and the metrics against fp32."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.data import eval_sets
from qgraph.errors import CalibrationError

needs_photos = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("sklearn", "skimage")),
    reason="scikit-learn / scikit-image not installed",
)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 16), st.integers(2, 12), st.integers(0, 2**31 - 1))
def test_kl_is_zero_on_self_positive_otherwise_and_shift_invariant(rows, classes, seed):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(rows, classes, generator=g) * 3
    other = torch.randn(rows, classes, generator=g) * 3
    assert eval_sets.kl(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert eval_sets.kl(ref, ref + 5.0) == pytest.approx(0.0, abs=1e-9)  # softmax ignores a constant shift
    assert eval_sets.kl(ref, other) > 0.0
    m = eval_sets.classification_metrics(ref, other, ref.argmax(-1))
    assert m["agreement"] == m["accuracy"]  # labels = reference top-1
    assert 0.0 <= m["agreement"] <= 1.0


def test_metrics_by_hand():
    ref = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    out = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    m = eval_sets.classification_metrics(ref, out, torch.tensor([0, 0, 1, 1]))
    assert m["agreement"] == 0.75 and m["accuracy"] == 0.75
    p = ref.softmax(-1)
    q = out.softmax(-1)
    expected = float((p * (p / q).log()).sum(-1).mean())
    assert math.isclose(m["kl"], expected, rel_tol=1e-6)
    with pytest.raises(CalibrationError, match="differ in shape"):
        eval_sets.classification_metrics(ref, out[:2])


def test_unknown_model_names_the_choices():
    with pytest.raises(CalibrationError, match="digits-cnn, mobilenetv2"):
        eval_sets.eval_set("resnet50")


@pytest.mark.models
@pytest.mark.slow
@needs_photos
def test_mobilenetv2_set_sizes_mirrors_and_determinism():
    from qgraph.data import images

    es = eval_sets.mobilenetv2_set(quick=True)
    assert es.inputs.shape == (24, 3, 224, 224)  # 6 photos x (center, mirror, 2 random views)
    assert len(es.calibration) == 4 and es.calibration[0][0].shape == (8, 3, 224, 224)
    assert es.labels is None and es.metrics == ("agreement", "kl")
    x = es.inputs.view(6, 4, 3, 224, 224)
    torch.testing.assert_close(x[:, 1], x[:, 0].flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(x[:, 0], images.evaluation_images(), rtol=0, atol=0)
    torch.testing.assert_close(eval_sets.mobilenetv2_eval_inputs(2), es.inputs, rtol=0, atol=0)
    # no evaluation image is a calibration image (the photos are disjoint)
    cal = torch.cat([b[0] for b in es.calibration]).flatten(1)
    assert torch.cdist(es.inputs.flatten(1)[:, ::97], cal[:, ::97]).min() > 1.0


@pytest.mark.models
@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed")
def test_digits_set_is_the_labelled_test_split():
    es = eval_sets.eval_set("digits-cnn")
    assert es.inputs.shape == (360, 1, 8, 8) and es.labels.shape == (360,)
    assert len(es.calibration) == 8 and es.calibration[0][0].shape == (32, 1, 8, 8)
    assert len(eval_sets.digits_set(quick=True).calibration) == 4
    assert es.metrics == ("accuracy", "agreement", "kl")
