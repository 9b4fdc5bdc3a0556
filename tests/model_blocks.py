"""Small models built from the characteristic blocks of common architecture families.

Each is a few thousand parameters, so tests can train and export them in seconds; together they cover
what users bring: inverted residuals (MobileNetV2), basic residual blocks (ResNet), squeeze-excite
with hardsigmoid (MobileNetV3), SiLU (EfficientNet), concat and channel shuffle (ShuffleNet, SqueezeNet).
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand -> depthwise -> linear projection (conv -> BN, no activation), plus the input."""

    def __init__(self, channels: int, expansion: int = 4) -> None:
        super().__init__()
        hidden = channels * expansion
        self.expand = conv_bn(channels, hidden, 1, act=nn.ReLU6)
        self.depthwise = conv_bn(hidden, hidden, 3, groups=hidden, act=nn.ReLU6)
        self.project = conv_bn(hidden, channels, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.depthwise(self.expand(x)))


class InvertedResidualNet(nn.Module):
    """A MobileNetV2-style net: Hardswish stem, inverted residuals, a strided conv, pooling, a classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(1, 16, 3, 2, act=nn.Hardswish)
        self.block1 = InvertedResidual(16)
        self.down = conv_bn(16, 32, 3, 2, act=nn.ReLU6)
        self.block2 = InvertedResidual(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.block2(self.down(self.block1(self.stem(x))))).flatten(1))
