"""scikit-learn's bundled handwritten digits (1797 real 8x8 scans, labels 0-9) as a fixed, stratified
train/test split of normalized image tensors.

The split is stratified by label with a fixed seed, so every caller (training, calibration, evaluation)
sees the same held-out test images. Pixels (0..16) are mapped to [-1, 1].
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from qgraph.errors import CalibrationError, ModelLoadError

TEST_FRACTION = 0.2
PIXEL_MAX = 16.0


@dataclass(frozen=True)
class DigitsSplit:
    """``x_*``: float [N,1,8,8] in [-1,1]; ``y_*``: int64 [N] labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def normalize(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Raw digits pixels (0..16, any shape with 64 values per image) -> float [N,1,8,8] in [-1,1]."""
    x = torch.as_tensor(np.asarray(pixels), dtype=torch.float32).reshape(-1, 1, 8, 8)
    return x / (PIXEL_MAX / 2) - 1.0


def digits_split(seed: int = 0, test_fraction: float = TEST_FRACTION) -> DigitsSplit:
    """The stratified split (fresh tensors; the arrays behind them are cached): 1437 train / 360 test."""
    if not 0.0 < test_fraction < 1.0:
        raise CalibrationError(f"test_fraction must be in (0, 1), got {test_fraction}")
    xtr, ytr, xte, yte = _split_cached(seed, test_fraction)
    return DigitsSplit(normalize(xtr), torch.from_numpy(ytr.copy()), normalize(xte), torch.from_numpy(yte.copy()))


@cache
def _split_cached(seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if importlib.util.find_spec("sklearn") is None:
        raise ModelLoadError("the digits data set ships with scikit-learn, which is not installed: "
                             "pip install scikit-learn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    xtr, xte, ytr, yte = train_test_split(bunch.data, bunch.target.astype(np.int64), test_size=test_fraction,
                                          stratify=bunch.target, random_state=seed)
    return xtr, ytr, xte, yte


def calibration_batches(n: int, batch_size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """``n`` batches [batch_size,1,8,8] of training images (never test images), in a fixed shuffled order;
    the count is capped at what the training split holds."""
    if n < 1 or batch_size < 1:
        raise CalibrationError(f"calibration_batches needs n >= 1 and batch_size >= 1, got {n}, {batch_size}")
    x = digits_split(seed).x_train
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed + 1))
    x = x[perm]
    n = min(n, x.shape[0] // batch_size)
    return [x[i * batch_size : (i + 1) * batch_size] for i in range(n)]
