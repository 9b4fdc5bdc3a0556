"""Small models with the blocks channel pruning must handle: residual adds, concat, depthwise, and a trap."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(in_c: int, out_c: int, k: int = 3, stride: int = 1, groups: int = 1, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_c, out_c, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(out_c), act())


class ResidualBlock(nn.Module):
    """ResNet BasicBlock shape: two 3x3 convs and an identity (or 1x1 projection) shortcut, one add."""

    def __init__(self, in_c: int, out_c: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(in_c, out_c, stride=stride), nn.Conv2d(out_c, out_c, 3, 1, 1, bias=False), nn.BatchNorm2d(out_c))
        self.shortcut = nn.Identity() if stride == 1 and in_c == out_c else nn.Sequential(nn.Conv2d(in_c, out_c, 1, stride, bias=False), nn.BatchNorm2d(out_c))
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(1, 16, stride=2)
        self.layers = nn.Sequential(ResidualBlock(16, 16), ResidualBlock(16, 32, stride=2), ResidualBlock(32, 32))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))


class ConcatNet(nn.Module):
    """Inception-style: two branches concatenated, then a 1x1 conv over both."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(1, 16, stride=2)
        self.branch_a = conv_bn(16, 24, k=1)
        self.branch_b = nn.Sequential(conv_bn(16, 16, groups=16), conv_bn(16, 32, k=1))
        self.mix = conv_bn(56, 48, k=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, num_classes))

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.mix(torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)))


class SigmoidGateNet(nn.Module):
    """A conv whose channels pass through a sigmoid: sigmoid(0) = 0.5, so a masked channel is not a removed one."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(1, 16, stride=2)
        self.gate = conv_bn(16, 32, k=1, act=nn.Sigmoid)
        self.out = conv_bn(32, 32, k=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.head(self.out(self.gate(self.stem(x))))
