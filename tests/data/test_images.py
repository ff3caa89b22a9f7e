"""ImageNet preprocessing in pure torch, the bundled photos (disjoint calibration/evaluation sets,
deterministic augmentation), and user image folders."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.data import images
from qgraph.errors import CalibrationError

needs_photos = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("sklearn", "skimage")),
    reason="scikit-learn / scikit-image not installed",
)
MEAN = torch.tensor(images.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(images.IMAGENET_STD).view(3, 1, 1)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(224, 600),
    st.integers(224, 600),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 255),
)
def test_constant_image_maps_to_normalized_constant(h, w, r, g, b):
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[...] = (r, g, b)
    out = images.preprocess(img)
    assert out.shape == (3, 224, 224)
    expected = (torch.tensor([r, g, b], dtype=torch.float32).view(3, 1, 1) / 255 - MEAN) / STD
    torch.testing.assert_close(out, expected.expand(3, 224, 224), rtol=0, atol=1e-5)


def test_resize_keeps_aspect_and_center_crop_is_centered():
    # 256 x 512 image whose left and right quarters are black, middle half white: resize keeps 256 x 512,
    # the centered 224 crop sees only the white middle.
    img = np.zeros((256, 512, 3), dtype=np.uint8)
    img[:, 128:384] = 255
    out = images.preprocess(img)
    white = ((torch.ones(3, 1, 1) - MEAN) / STD).expand(3, 224, 224)
    torch.testing.assert_close(out, white, rtol=0, atol=1e-5)


def test_grayscale_is_repeated_to_rgb():
    gray = np.arange(300 * 400, dtype=np.uint32).reshape(300, 400) % 256
    out = images.preprocess(gray.astype(np.uint8))
    raw = out * STD + MEAN
    torch.testing.assert_close(raw[0], raw[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(raw[0], raw[2], rtol=0, atol=1e-6)


@needs_photos
def test_calibration_and_evaluation_are_disjoint():
    assert not set(images.CALIBRATION_PHOTOS) & set(images.EVALUATION_PHOTOS)
    ev = images.evaluation_images()
    cal = images.calibration_images(augment=False)
    assert ev.shape == (len(images.EVALUATION_PHOTOS), 3, 224, 224)
    assert cal.shape == (len(images.CALIBRATION_PHOTOS), 3, 224, 224)
    flat_ev, flat_cal = ev.flatten(1), cal.flatten(1)
    assert torch.cdist(flat_ev, flat_cal).min() > 1.0  # no calibration image equals an evaluation image


@needs_photos
def test_augmentation_is_deterministic_and_differs_from_center_crop():
    names = ("chelsea", "coffee")
    a = images.sample_images(names, augment=True, views=2, seed=5)
    b = images.sample_images(names, augment=True, views=2, seed=5)
    c = images.sample_images(names, augment=True, views=2, seed=6)
    assert a.shape == (6, 3, 224, 224)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[[0, 3]], images.sample_images(names))  # center views come first per photo
    assert (a[1] - a[0]).abs().mean() > 0.05


@needs_photos
def test_calibration_batches_cover_request():
    batches = images.calibration_batches(4, batch_size=8)
    assert len(batches) == 4 and all(b.shape == (8, 3, 224, 224) for b in batches)


def test_unknown_photo_lists_names():
    with pytest.raises(CalibrationError, match="chelsea"):
        images.load_photo("dog")


def test_load_image_folder_matches_preprocess(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=(240 + 10 * i, 300, 3), dtype=np.uint8) for i in range(3)]
    for i, arr in enumerate(arrays):
        Image.fromarray(arr).save(tmp_path / f"img{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    batch = images.load_image_folder(tmp_path)
    assert batch.shape == (3, 3, 224, 224)
    for got, arr in zip(batch, arrays):
        torch.testing.assert_close(got, images.preprocess(arr), rtol=0, atol=1e-6)
    assert images.load_image_folder(tmp_path, limit=2).shape[0] == 2


def test_load_image_folder_errors(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        images.load_image_folder(tmp_path / "nope")
    with pytest.raises(CalibrationError, match="no images"):
        images.load_image_folder(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(CalibrationError, match="could not read"):
        images.load_image_folder(tmp_path)
