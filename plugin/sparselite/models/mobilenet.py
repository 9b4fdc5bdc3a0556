"""MobileNet-style CNNs for 28x28 inputs: a 3x3 stem, then depthwise 3x3 + pointwise 1x1 blocks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from sparselite.errors import SparseliteError


def conv_bn_relu6(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class MobileNetLite(nn.Module):
    """MobileNet v1's channel widths (32 up to 1024), shortened for 28x28 Fashion-MNIST: two 512-wide
    blocks where v1 has six, one 1024-wide block where v1 has two.

    The two widest 1x1 convs (512->512, 512->1024) run at 2x2 resolution: they add weights (1.08M in
    all) but little compute. The weights are there on purpose: in the MobileNets people ship, the pruned
    1x1 convs dominate the file. In an earlier 270K-weight layout (widest layer 256->512), per-channel
    scales, zero points and int32 biases (12-20 bytes a channel, which sparsity cannot shrink) were a
    third of an 80%-sparse file, so it could not show what sparse storage buys.

    Args:
        num_classes: output logits.
        in_channels: image channels.
        stem_channels: channels of the 3x3 stem conv.
        blocks: (out_channels, stride) per depthwise-separable block.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, stem_channels: int = 32,
                 blocks: Sequence[Sequence[int]] = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 1), (512, 2), (1024, 1))) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("stem_channels", stem_channels)):
            if value < 1:
                raise SparseliteError(f"{name}={value} must be >= 1")
        for block in blocks:
            if len(block) != 2 or block[0] < 1 or not 1 <= block[1] <= 4:
                raise SparseliteError(f"block {list(block)} must be [out_channels >= 1, stride in 1..4]")
        # A stride-2 stem: 14x14 feature maps keep CPU training of the demo within minutes.
        layers = [conv_bn_relu6(in_channels, stem_channels, 3, stride=2)]
        channels = stem_channels
        for out_channels, stride in blocks:
            layers.append(conv_bn_relu6(channels, channels, 3, stride=stride, groups=channels))
            layers.append(conv_bn_relu6(channels, out_channels, 1))
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))
