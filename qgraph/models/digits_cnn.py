"""A small CNN for scikit-learn's 8x8 digits, trained here on the real labels (CPU, one thread, seconds).

Layout: stem conv -> one residual block (conv-BN-ReLU, conv-BN, add, ReLU: a block for block-wise
reconstruction) -> strided conv to 4x4 -> global average pool -> Linear head. Every conv is followed by
BatchNorm, so ``fold-bn`` has work to do, as in MobileNetV2.

Training is deterministic for a given ``(seed, epochs, width)``: it runs on one thread under a forked RNG
(the caller's RNG state and thread count are restored), and the state dict is kept in memory and on disk
under the same cache folder as SmolLM2's fp32 copy (``$QGRAPH_CACHE_DIR`` or ``~/.cache/qgraph``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qgraph.data.digits import digits_split
from qgraph.models.smollm2 import disk_cache_dir

EPOCHS = 12
WIDTH = 16
BATCH_SIZE = 32
LR = 3e-3
CACHE_VERSION = 1  # bump when the architecture or the training recipe changes
INSTALL_HINT = "pip install scikit-learn"

_STATES: dict[tuple[int, int, int], dict[str, torch.Tensor]] = {}
_LOCK = threading.Lock()


def _conv_bn(in_ch: int, out_ch: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch)


class ResidualBlock(nn.Module):
    """relu(x + bn2(conv2(relu(bn1(conv1(x))))))."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(ch, ch)
        self.conv2, self.bn2 = _conv_bn(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class DigitsCNN(nn.Module):
    """[B,1,8,8] (pixels in [-1,1]) -> logits [B,10]."""

    def __init__(self, width: int = WIDTH, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(1, width), nn.ReLU())
        self.block = ResidualBlock(width)
        self.down = nn.Sequential(*_conv_bn(width, 2 * width, stride=2), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.block(self.stem(x)))
        return self.head(torch.flatten(self.pool(x), 1))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` (no grad, batched)."""
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + batch_size]).argmax(-1) for i in range(0, x.shape[0], batch_size)])
    return float((pred == y).float().mean())


def _cache_path(seed: int, epochs: int, width: int) -> Path:
    return disk_cache_dir() / f"digits-cnn-v{CACHE_VERSION}-w{width}-e{epochs}-s{seed}.pt"


def _train_state(seed: int, epochs: int, width: int) -> dict[str, torch.Tensor]:
    """Train from scratch on the training split: AdamW, cosine learning rate, batch 32, one thread."""
    data = digits_split()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DigitsCNN(width)
            gen = torch.Generator().manual_seed(seed)
            steps_per_epoch = -(-data.x_train.shape[0] // BATCH_SIZE)
            opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=epochs * steps_per_epoch)
            model.train()
            for _ in range(epochs):
                perm = torch.randperm(data.x_train.shape[0], generator=gen)
                for i in range(0, perm.numel(), BATCH_SIZE):
                    idx = perm[i : i + BATCH_SIZE]
                    loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _load_or_train(seed: int, epochs: int, width: int, cache: bool) -> dict[str, torch.Tensor]:
    key = (seed, epochs, width)
    if not cache:
        return _train_state(seed, epochs, width)
    with _LOCK:
        if key in _STATES:
            return _STATES[key]
        path = _cache_path(seed, epochs, width)
        state = None
        if path.is_file():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - any unreadable copy (truncated, other format): retrain
                state = None
        if state is None:
            state = _train_state(seed, epochs, width)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save(state, tmp)
                os.replace(tmp, path)
            except OSError:
                pass  # a read-only cache folder only costs a retrain next time
        _STATES[key] = state
        return state


def train_digits_cnn(seed: int = 0, epochs: int = EPOCHS, width: int = WIDTH, *, cache: bool = True) -> DigitsCNN:
    """A trained `DigitsCNN` in eval mode (a fresh module each call, so passes may rewrite it in place).

    ``cache=False`` always trains (and neither reads nor writes the caches)."""
    model = DigitsCNN(width)
    model.load_state_dict(_load_or_train(seed, epochs, width, cache))
    return model.eval()


def load_digits_cnn() -> DigitsCNN:
    """The bundled digits CNN: default seed and recipe, from the cache when trained before."""
    return train_digits_cnn()
