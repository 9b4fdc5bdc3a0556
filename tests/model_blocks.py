"""Small models built from the characteristic blocks of common architecture families.

Each is a few thousand parameters, so tests can train and export them in seconds; together they cover
what users bring: inverted residuals (MobileNetV2), basic residual blocks (ResNet), squeeze-excite
with hardsigmoid (MobileNetV3), SiLU (EfficientNet), concat and channel shuffle (ShuffleNet, SqueezeNet),
clamps on a learned grid, DenseNet's block (a container that runs its children, concatenating
more inputs than XNNPACK takes at once), VGG's fixed-size adaptive pooling over a smaller
feature map, CBAM's max-based attention and a U-Net's decoder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sparselite.models.sequence import GRUClassifier, KeywordSpotter  # noqa: F401  (families the tests use)


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


class BasicResidual(nn.Module):
    """ResNet's BasicBlock: one ReLU module called twice, the second time after the add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class SqueezeExcite(nn.Module):
    """MobileNetV3's squeeze-excite: pool -> 1x1 -> ReLU -> 1x1 -> gate, multiplied into the input."""

    def __init__(self, channels: int, gate: type[nn.Module] = nn.Hardsigmoid) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // 4, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(channels // 4, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class FireConcat(nn.Module):
    """SqueezeNet's fire module: squeeze, then two expand branches concatenated."""

    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
        self.expand1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
        self.expand3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze(x)
        return torch.cat([self.expand1(x), self.expand3(x)], 1)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: chunk, one branch through convs, concat, channel shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(conv_bn(half, half, 1), conv_bn(half, half, 3, groups=half, act=None), conv_bn(half, half, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x.chunk(2, dim=1)
        out = torch.cat((left, self.branch(right)), dim=1)
        b, c, h, w = out.shape
        return out.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class ChainedResidual(nn.Module):
    """Two residual adds in a row (``x = x + f(x)`` twice), as in pre-activation and transformer-style blocks."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.f = conv_bn(channels, channels, 3, act=nn.ReLU)
        self.g = conv_bn(channels, channels, 3, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.f(x)
        return x + self.g(x)


class ClampedResidual(nn.Module):
    """Clamps of values already on a learned grid: one ``nn.Hardtanh`` run on two convs' outputs (called
    twice, it fuses with neither) and a ``torch.clamp`` after a residual add. Their bounds (-1, 1) fall
    between grid values. (Bounds that no fused activation has, ``clamp(0, 2)``, become an int8 MINIMUM,
    which XNNPACK leaves to TFLite's kernels.)"""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.a = conv_bn(channels, channels, 3, act=None)
        self.b = conv_bn(channels, channels, 3, act=None)
        self.clamp = nn.Hardtanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x + self.clamp(self.b(self.clamp(self.a(x)))), -1.0, 1.0)


class AveragePools(nn.Module):
    """Averages over small windows, which export writes as depthwise convs of ones: DenseNet's
    transition (a conv, then a 2x2 average pool), Inception's padded 3x3 pool, and a squeeze-excite over
    a 4x4 map (and the classifier's pool over it). No activation before them: ties of the integers'
    means go either way with the zero point inside the range."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.transition = nn.Sequential(conv_bn(channels, channels, 1, act=None), nn.AvgPool2d(2))
        self.branch = nn.AvgPool2d(3, 1, 1)
        self.down = conv_bn(channels, channels, 3, 2, act=None)
        self.se = SqueezeExcite(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.down(self.branch(self.transition(x))))


class BlockNet(nn.Module):
    """Stem -> one block -> pooled classifier, so each family's block is tested in a whole model."""

    def __init__(self, block: nn.Module, channels: int, stem_act: type[nn.Module] = nn.ReLU, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(1, channels, 3, 2, act=stem_act)
        self.block = block
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.block_channels(channels), num_classes)

    def block_channels(self, channels: int) -> int:
        with torch.no_grad():
            return self.block(torch.zeros(1, channels, 8, 8)).shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.block(self.stem(x))).flatten(1))


class MBConvSiLU(nn.Module):
    """EfficientNet's MBConv: SiLU everywhere, squeeze-excite with a sigmoid gate, residual add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = channels * 4
        self.expand = conv_bn(channels, hidden, 1, act=nn.SiLU)
        self.depthwise = conv_bn(hidden, hidden, 3, groups=hidden, act=nn.SiLU)
        self.se = SqueezeExcite(hidden, gate=nn.Sigmoid)
        self.project = conv_bn(hidden, channels, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.depthwise(self.expand(x))))


class DenseBlock(nn.ModuleDict):
    """DenseNet's block, as torchvision writes it: an ``nn.ModuleDict`` whose forward runs each of its
    layers (BatchNorm, ReLU, conv) on the concatenation of the block input and every earlier layer's output."""

    def __init__(self, channels: int, growth: int = 4, layers: int = 6) -> None:
        # Pre-activation, as DenseNet's layers: BatchNorm -> ReLU -> conv, a BN that follows no conv.
        super().__init__({f"layer{i}": nn.Sequential(nn.BatchNorm2d(channels + i * growth), nn.ReLU(),
                                                     nn.Conv2d(channels + i * growth, growth, 3, padding=1))
                          for i in range(layers)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)  # 7 inputs: more than the 5 XNNPACK concatenates at once


class AdaptivePoolHead(nn.Module):
    """VGG's head: a fixed 7x7 adaptive average pool (over a 7x7 map at 224x224) on a map that does not
    tile into it (6x6 here, 2x2 for VGG at 64x64), flattened into the classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn(1, 8, 3, 2), conv_bn(8, 8, 3, 2), nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Linear(8 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class SpatialAttentionMaxHead(nn.Module):
    """CBAM's spatial attention (the channel mean and channel max, concatenated, a 7x7 conv, a sigmoid
    gate) and a global max pooling head (``nn.AdaptiveMaxPool2d``, which litert-torch cannot lower)."""

    def __init__(self, channels: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(1, channels, 3, 2)
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)
        self.tanh_conv = conv_bn(channels, channels, 3, act=nn.Tanh)  # TANH's fixed grid, read by a conv
        self.conv = conv_bn(channels, channels, 3)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        described = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        x = x * torch.sigmoid(self.spatial(described))
        return self.classifier(self.pool(self.conv(self.tanh_conv(x))).flatten(1))


class EncoderDecoder(nn.Module):
    """A U-Net's decoder: a transposed conv (with BN and ReLU) and a nearest upsampling back to the skip
    connection's size, concatenated with it."""

    def __init__(self, channels: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(1, channels, 3, 2)
        self.down = conv_bn(channels, channels, 3, 2)
        self.up = nn.Sequential(nn.ConvTranspose2d(channels, channels, 2, 2, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.mix = conv_bn(3 * channels, channels, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.stem(x)
        low = self.down(skip)
        x = torch.cat([skip, self.up(low), nn.functional.interpolate(low, scale_factor=2.0, mode="nearest")], 1)
        return self.classifier(self.pool(self.mix(x)).flatten(1))


class NormAct2d(nn.BatchNorm2d):
    """A norm and its activation in one module, as model libraries write them (timm's BatchNormAct2d): a
    BatchNorm2d subclass whose forward runs the norm, then its ``drop`` and ``act`` children."""

    def __init__(self, channels: int, act: type[nn.Module] | None = nn.ReLU) -> None:
        super().__init__(channels)
        self.drop = nn.Dropout(0.1)  # an identity in eval mode, as the file computes
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                                     self.momentum, self.eps)
        return self.act(self.drop(x))


class NormActResidual(nn.Module):
    """An inverted residual written with norm+activation modules: Hardswish expand, ReLU depthwise, a
    projection whose norm has no activation, and a pre-activation norm on the skip path (RepVGG's
    identity branch: a norm that follows no conv)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = channels * 2
        self.expand, self.bn1 = nn.Conv2d(channels, hidden, 1, bias=False), NormAct2d(hidden, nn.Hardswish)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = NormAct2d(hidden, nn.ReLU)
        self.project, self.bn3 = nn.Conv2d(hidden, channels, 1, bias=False), NormAct2d(channels, None)
        self.identity = NormAct2d(channels, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.project(self.bn2(self.depthwise(self.bn1(self.expand(x))))))
        return y + self.identity(x)


class MixedConvNorm(nn.Module):
    """MixNet's mixed depthwise conv: a pre-activation norm (ReLU inside) that follows no conv, the channels
    split between a 3x3 and a 5x5 depthwise conv, concatenated, then one norm+activation module (Hardswish
    inside) for the concatenation, whose norm folds into each conv's slice of channels; then a projection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pre = NormAct2d(channels, nn.ReLU)
        half = channels // 2
        self.conv3 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.conv5 = nn.Conv2d(channels - half, channels - half, 5, padding=2, groups=channels - half, bias=False)
        self.norm = NormAct2d(channels, nn.Hardswish)
        self.project, self.project_norm = nn.Conv2d(channels, channels, 1, bias=False), NormAct2d(channels, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.pre(x), [self.conv3.in_channels, self.conv5.in_channels], dim=1)
        y = self.norm(torch.cat([self.conv3(a), self.conv5(b)], dim=1))
        return self.project_norm(self.project(y))


class ConcatenatedConvsNorm(nn.Module):
    """Two full convs (3x3 and 1x1, of different widths) over halves of the input, concatenated, then one
    plain BatchNorm2d and a ReLU module for the concatenation: the BN folds into each conv's slice of
    channels and the ReLU clamps on the shared grid."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.wide = nn.Conv2d(half, 10, 3, padding=1, bias=False)
        self.narrow = nn.Conv2d(channels - half, channels - 4, 1)
        self.norm, self.act = nn.BatchNorm2d(channels + 6), nn.ReLU()
        self.project = nn.Conv2d(channels + 6, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return self.project(self.act(self.norm(torch.cat([self.wide(a), self.narrow(b)], 1))))


class LargeKernelDepthwise(nn.Module):
    """ConvNeXt's and MixNet's large depthwise kernels: a 7x7 conv -> BN -> ReLU and a 3x9 conv with no
    activation, whose negative ties show how TFLite rounds them (49 and 27 taps, which the file runs on
    TFLite's kernel rather than XNNPACK's), then a projection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.large = conv_bn(channels, channels, 7, groups=channels)
        self.wide = nn.Conv2d(channels, channels, (3, 9), padding=(1, 4), groups=channels)
        self.project = conv_bn(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.wide(self.large(x)))


class LargeKernelConv1dNet(nn.Module):
    """A Conformer-style depthwise Conv1d of 27 taps over [N, features, time] (28 rows of an image), which the
    file runs on TFLite's kernel, then a linear classifier over every time step."""

    def __init__(self, features: int = 28, channels: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(features, channels, 3, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 27, padding=13, groups=channels, bias=False), nn.BatchNorm1d(channels), nn.ReLU(),
        )
        self.classifier = nn.Linear(channels * features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x.flatten(1, 2)).flatten(1))


class TFSameConv2d(nn.Conv2d):
    """A conv that pads as TensorFlow's SAME, from the input's size (timm's Conv2dSame, in EfficientNet's
    and MixNet's TF ports): the odd pixel after, so a strided conv's windows differ from torch's padding."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, padding=0, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in reversed(list(zip(x.shape[-2:], self.kernel_size, self.stride))):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(nn.functional.pad(x, pads))


class TFSameBlock(nn.Module):
    """A TF-port's convs: a strided SAME depthwise conv (BN, ReLU6), then a SAME 3x3 conv (BN, ReLU)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Sequential(TFSameConv2d(channels, channels, 3, stride=2, groups=channels, bias=False),
                                       nn.BatchNorm2d(channels), nn.ReLU6())
        self.pointwise = nn.Sequential(TFSameConv2d(channels, channels, 3, bias=False), nn.BatchNorm2d(channels), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class AffineChannelPad(nn.Module):
    """A learned scalar affine after an activation (``x * self.scale + self.shift``, two 0-d Parameters)
    and a residual that widens its skip path with zero channels (ResNet's shortcut option A)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv_bn(channels, 2 * channels, 3)
        self.scale, self.shift = nn.Parameter(torch.tensor(1.0)), nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.scale + self.shift + torch.cat([x, torch.zeros_like(x)], dim=1)


def family_models() -> dict[str, Callable[[], nn.Module]]:
    """How to build one small model per architecture family, keyed by the block it tests (built on
    demand, so that a family's initial weights do not depend on which other families exist)."""
    return {
        "basic_residual": lambda: BlockNet(BasicResidual(16), 16),
        "inverted_residual": InvertedResidualNet,
        "chained_residual": lambda: BlockNet(ChainedResidual(16), 16),
        "clamped_residual": lambda: BlockNet(ClampedResidual(16), 16),
        "squeeze_excite_hardsigmoid": lambda: BlockNet(nn.Sequential(conv_bn(16, 16, 3, act=nn.Hardswish), SqueezeExcite(16)), 16, stem_act=nn.Hardswish),
        "mbconv_silu": lambda: BlockNet(MBConvSiLU(16), 16, stem_act=nn.SiLU),
        "fire_concat": lambda: BlockNet(FireConcat(16, 8, 16), 16),
        "channel_shuffle": lambda: BlockNet(ShuffleUnit(16), 16),
        "dense_block": lambda: BlockNet(DenseBlock(16), 16),
        "adaptive_pool": AdaptivePoolHead,
        "average_pools": lambda: BlockNet(AveragePools(16), 16),
        "max_attention": SpatialAttentionMaxHead,
        "encoder_decoder": EncoderDecoder,
        "norm_activation_modules": lambda: BlockNet(NormActResidual(16), 16),
        "norm_after_concatenation": lambda: BlockNet(MixedConvNorm(16), 16),
        "norm_after_concatenated_convs": lambda: BlockNet(ConcatenatedConvsNorm(16), 16),
        "tf_same_padding": lambda: BlockNet(TFSameBlock(16), 16),
        "scalar_affine_channel_pad": lambda: BlockNet(AffineChannelPad(16), 16),
        "large_kernel_depthwise": lambda: BlockNet(LargeKernelDepthwise(16), 16),
        "large_kernel_conv1d": LargeKernelConv1dNet,
    }


class TransformerBlockNet(nn.Module):
    """A ViT-style classifier: patch embedding, one pre-norm encoder block (LayerNorm, attention, GELU MLP)."""

    def __init__(self, dim: int = 32, patch: int = 7, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, patch, patch)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        normed = self.norm1(tokens)
        tokens = tokens + self.attn(normed, normed, normed, need_weights=False)[0]
        tokens = tokens + self.mlp(self.norm2(tokens))
        return self.head(tokens.mean(1))
