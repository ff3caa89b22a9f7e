"""Real photos that ship inside installed packages (scikit-learn, scikit-image), ImageNet preprocessing
in pure torch, and a loader for user image folders.

Calibration and evaluation use disjoint photos: ``EVALUATION_PHOTOS`` are the ones with a clear ImageNet
subject (the pretrained MobileNetV2 is confident on them, so top-1 agreement is meaningful);
``CALIBRATION_PHOTOS`` are all the others (natural photos, grayscale photos, textures, microscopy).
"""

from __future__ import annotations

import importlib.util
import math
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qgraph.errors import CalibrationError, ModelLoadError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE = 256
CROP = 224
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# name -> (package, loader attribute). scikit-image's cat() and chelsea() are the same photo.
_SKIMAGE = {
    "astronaut": "astronaut",
    "chelsea": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
    "motorcycle": "stereo_motorcycle",
    "camera": "camera",
    "clock": "clock",
    "coins": "coins",
    "moon": "moon",
    "hubble": "hubble_deep_field",
    "immunohistochemistry": "immunohistochemistry",
    "retina": "retina",
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
}
_SKLEARN = ("china", "flower")

EVALUATION_PHOTOS: tuple[str, ...] = ("chelsea", "coffee", "motorcycle", "china", "camera", "rocket")
CALIBRATION_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "flower",
    "clock",
    "coins",
    "moon",
    "hubble",
    "immunohistochemistry",
    "retina",
    "brick",
    "grass",
    "gravel",
)


def photo_names() -> tuple[str, ...]:
    """All bundled photo names: evaluation photos first, then calibration photos."""
    return EVALUATION_PHOTOS + CALIBRATION_PHOTOS


def _require(module: str, pip_name: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelLoadError(
            f"the bundled photos need '{pip_name}', which is not installed: pip install {pip_name}"
        )


@cache
def _sklearn_photos() -> dict[str, np.ndarray]:
    _require("sklearn", "scikit-learn")
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return {Path(f).stem: img for f, img in zip(bunch.filenames, bunch.images)}


def load_photo(name: str) -> np.ndarray:
    """One bundled photo as uint8 HxWx3 RGB (grayscale photos are repeated to 3 channels); a fresh copy."""
    return _load_photo_cached(name).copy()


@cache
def _load_photo_cached(name: str) -> np.ndarray:
    if name in _SKLEARN:
        img = _sklearn_photos()[name]
    elif name in _SKIMAGE:
        _require("skimage", "scikit-image")
        import skimage.data

        img = getattr(skimage.data, _SKIMAGE[name])()
        if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity): keep the left view
            img = img[0]
    else:
        raise CalibrationError(f"unknown bundled photo {name!r}; choose from {', '.join(photo_names())}")
    return _to_rgb_uint8(np.asarray(img))


def _to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise CalibrationError(f"expected an HxW, HxWx3 or HxWx4 image, got shape {img.shape}")
    return np.array(img[:, :, :3], dtype=np.uint8, order="C", copy=True)


def _to_chw_float(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(_to_rgb_uint8(img)).permute(2, 0, 1).float().div_(255.0)


def _resize_short_side(x: torch.Tensor, size: int) -> torch.Tensor:
    """[3,H,W] -> short side ``size`` with the long side scaled to keep the aspect ratio (bilinear, antialias)."""
    h, w = x.shape[-2:]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    out = F.interpolate(x[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    return out[0].clamp_(0.0, 1.0)


def _crop(x: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    return x[:, top : top + size, left : left + size]


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def preprocess(img: np.ndarray) -> torch.Tensor:
    """ImageNet evaluation transform: resize short side to 256, center crop 224, normalize -> [3,224,224]."""
    x = _resize_short_side(_to_chw_float(img), RESIZE)
    h, w = x.shape[-2:]
    top, left = round((h - CROP) / 2.0), round((w - CROP) / 2.0)
    return _normalize(_crop(x, top, left, CROP))


def augmented_views(img: np.ndarray, views: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``views`` random views: short side resized to a size in [224, 320], random 224 crop, random flip."""
    base = _to_chw_float(img)
    out = []
    for _ in range(views):
        size = int(torch.randint(CROP, 321, (1,), generator=generator))
        x = _resize_short_side(base, size)
        h, w = x.shape[-2:]
        top = int(torch.randint(0, h - CROP + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - CROP + 1, (1,), generator=generator))
        x = _crop(x, top, left, CROP)
        if bool(torch.rand((), generator=generator) < 0.5):
            x = x.flip(-1)
        out.append(_normalize(x))
    return out


def sample_images(
    names: tuple[str, ...] | list[str] | None = None, augment: bool = False, views: int = 3, seed: int = 0
) -> torch.Tensor:
    """Bundled photos as a float tensor [N,3,224,224] (ImageNet-normalized), in the order of ``names``
    (default: ``photo_names()``). With ``augment``, each photo's center view is followed by ``views``
    random crops/flips (deterministic for a given ``seed``), so N = len(names) * (1 + views)."""
    names = tuple(photo_names() if names is None else names)
    if not names:
        raise CalibrationError("sample_images() needs at least one photo name")
    gen = torch.Generator().manual_seed(seed)
    batch: list[torch.Tensor] = []
    for name in names:
        img = load_photo(name)
        batch.append(preprocess(img))
        if augment:
            batch.extend(augmented_views(img, views, gen))
    return torch.stack(batch)


def calibration_images(augment: bool = True, views: int = 3, seed: int = 0) -> torch.Tensor:
    """Calibration photos (disjoint from the evaluation photos), by default with augmented views."""
    return sample_images(CALIBRATION_PHOTOS, augment=augment, views=views, seed=seed)


def evaluation_images(views: int = 0, seed: int = 1) -> torch.Tensor:
    """Evaluation photos in ``EVALUATION_PHOTOS`` order: center crops only by default ([6,3,224,224]);
    ``views > 0`` adds that many random crops/flips after each center crop."""
    return sample_images(EVALUATION_PHOTOS, augment=views > 0, views=views, seed=seed)


def calibration_batches(n: int, batch_size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """``n`` calibration batches [batch_size,3,224,224]; adds augmented views until there are enough."""
    if n < 1 or batch_size < 1:
        raise CalibrationError(f"calibration_batches needs n >= 1 and batch_size >= 1, got {n}, {batch_size}")
    views = max(1, math.ceil(n * batch_size / len(CALIBRATION_PHOTOS)) - 1)
    images = calibration_images(augment=True, views=views, seed=seed)
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    images = images[perm]
    return [images[i * batch_size : (i + 1) * batch_size] for i in range(n)]


def load_image_folder(path: str | Path, limit: int | None = None) -> torch.Tensor:
    """Every image file directly in ``path`` (sorted by name), ImageNet-preprocessed: [N,3,224,224]."""
    folder = Path(path)
    if not folder.is_dir():
        raise CalibrationError(f"image folder {folder} does not exist or is not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if limit is not None:
        files = files[:limit]
    if not files:
        raise CalibrationError(f"no images in {folder}; expected files ending in {', '.join(IMAGE_SUFFIXES)}")
    _require("PIL", "pillow")
    from PIL import Image, UnidentifiedImageError

    batch = []
    for f in files:
        try:
            with Image.open(f) as im:
                batch.append(preprocess(np.asarray(im.convert("RGB"))))
        except (UnidentifiedImageError, OSError) as exc:
            raise CalibrationError(
                f"could not read image {f}: {exc}; remove it or convert it to PNG/JPEG"
            ) from exc
    return torch.stack(batch)
