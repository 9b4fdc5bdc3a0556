"""TFLite's int8 scheme, with the exact formulas torchao's observers use at export.

Training and export must agree bit for bit on scales and zero points, so both sides compute them here.
  - weights: per output channel, symmetric, int8 in [-127, 127], scale from the current weights;
  - activations: per tensor, affine, int8 in [-128, 127];
  - biases: int32, per output channel on the grid input scale x weight scale (of the BN-folded weight).
"""

from __future__ import annotations

import torch

WEIGHT_QMIN, WEIGHT_QMAX = -127, 127
ACT_QMIN, ACT_QMAX = -128, 127
# litert's quantizer builds its observers with eps=2**-12: the smallest scale it will emit.
SCALE_EPS = 2.0**-12
# Ops whose int8 output TFLite fixes, whatever the data: (scale, zero point). LOGISTIC and SOFTMAX map
# [0, 1) onto the whole int8 range, TANH maps [-1, 1).
FIXED_OUTPUT_QPARAMS = {"sigmoid": (1.0 / 256, -128), "softmax": (1.0 / 256, -128), "tanh": (1.0 / 128, 0)}
# Ops (aten base names) whose int8 output TFLite keeps on its input's grid: activations that fuse or
# clamp, pooling, every shape op. Export shares their input's observer; training passes the input's
# grid on to them (``quantization/int8_rounding.py``).
SHARES_INPUT_RANGE = {
    "relu", "hardtanh", "relu6", "clamp", "clamp_min", "clamp_max",
    "max_pool1d", "max_pool2d", "max_pool2d_with_indices", "adaptive_max_pool2d", "avg_pool1d", "avg_pool2d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "mean",
    "view", "_unsafe_view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "t",
    "contiguous", "clone", "alias", "detach", "dropout", "expand", "slice", "select", "narrow",
    "pad", "constant_pad_nd", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle",
    "flip", "roll", "_to_copy", "to", "upsample_nearest2d", "upsample_bilinear2d", "max", "min", "amax", "amin",
}
# Ops whose outputs are pieces of their input, each on the input's grid.
SPLITS = {"split", "split_with_sizes", "chunk", "unbind", "tensor_split", "unsafe_split"}

# The int8 file writes an average over a window of at most this many values as a DEPTHWISE_CONV_2D of
# ones (``export/xnnpack_pool_forms.py``): XNNPACK (ai-edge-litert 2.3) runs an int8 MEAN as int32 sums requantized
# by a scalar loop (up to 2.6x the conv's time, with 576 channels), and an int8 AVERAGE_POOL_2D not at
# all (TFLite's kernel, outside the delegate). 25 is the largest kernel XNNPACK's one-pass depthwise
# kernels take: a 7x7 mean as a conv took 2.5-25x the MEAN's time (docs/upstream/xnnpack_int8_average.md).
AVERAGE_AS_DEPTHWISE_MAX_WINDOW = 25


def average_as_depthwise(window: int) -> bool:
    """Whether the int8 file computes an average over ``window`` values as a depthwise conv of ones.

    The conv requantizes the integers' sum with a float scale (1 / window, the input's scale kept):
    a power-of-two window scales exactly, and the mean of an odd number of integers is never a tie,
    so either way it is the mean rounded half to even, and the zero point added after. Other windows
    (6, 12, ...) have ties the float scale's error would decide: they stay MEANs, which add the zero
    point before rounding.
    """
    return 1 <= window <= AVERAGE_AS_DEPTHWISE_MAX_WINDOW and (window % 2 == 1 or window & (window - 1) == 0)


# XNNPACK's largest one-pass depthwise kernel (5x5). ai-edge-litert 2.3 runs a depthwise conv of more taps
# 2-13x slower than TFLite's own kernel, so export leaves such convs to that kernel
# (``export/xnnpack_forms.large_depthwise_kernels_on_tflite``, docs/upstream/xnnpack_large_depthwise.md),
# whose requantization rounds otherwise (``int8_layer``).
XNNPACK_MAX_FAST_DEPTHWISE_TAPS = 25


def kernel_taps_used(kernel: int, size: int) -> int:
    """How many taps of a stride-1 odd ``kernel`` with SAME padding reach an input of ``size`` rows (or
    columns): the middle 2 x size - 1; the others read padding at every output position, and export
    crops them (``export/xnnpack_pool_forms.crop_kernels_to_their_input``)."""
    return min(kernel, 2 * size - 1)


def depthwise_on_tflite_kernel(kernel: tuple[int, int], input_size: tuple[int, int], cropped: bool) -> bool:
    """Whether the int8 file runs a depthwise conv (one output channel per input channel) of this kernel on
    TFLite's kernel rather than XNNPACK's: more than 25 taps once export has cropped it (``cropped``: a
    stride-1 odd kernel with SAME padding)."""
    if cropped:
        kernel = (kernel_taps_used(kernel[0], input_size[0]), kernel_taps_used(kernel[1], input_size[1]))
    return kernel[0] * kernel[1] > XNNPACK_MAX_FAST_DEPTHWISE_TAPS


def non_overlapping_patches(kernel: tuple[int, int], stride: tuple[int, int], input_size: tuple[int, int]) -> bool:
    """Whether a conv (no padding, no dilation) reads square windows that neither overlap nor leave a gap, over
    an input they tile: a ViT's patch embedding, ConvNeXt's stem. Export writes it as SPACE_TO_DEPTH and a
    1x1 conv (``export/xnnpack_forms.patch_convs_as_space_to_depth``), which XNNPACK runs as a fully
    connected layer over the patches."""
    return (kernel[0] == kernel[1] == stride[0] == stride[1] > 1
            and input_size[0] % kernel[0] == 0 and input_size[1] % kernel[1] == 0)


def weight_scales(weight: torch.Tensor, fold_factor: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output-channel symmetric scale (a fully pruned channel gets the eps scale, and stays 0).

    ``fold_factor``: the per-channel |gamma| / sqrt(var + eps) of a BatchNorm that export folds into
    this weight. Export takes the scale of the *folded* weight, clamped at eps; mapping that scale
    back through the factor gives the unfolded weight exactly the int8 values the file will hold,
    including channels whose folded scale sits on the eps floor.
    """
    amax = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1)
    half_range = (WEIGHT_QMAX - WEIGHT_QMIN) / 2
    if fold_factor is None:
        return torch.clamp(amax / half_range, min=SCALE_EPS)
    factor = fold_factor.detach().clamp(min=1e-12)
    return torch.clamp(amax * factor / half_range, min=SCALE_EPS) / factor


def activation_qparams(min_val: torch.Tensor, max_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of an observed [min, max], widened to contain 0 so that 0 is exact."""
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    scale = torch.clamp((max_pos - min_neg) / float(ACT_QMAX - ACT_QMIN), min=SCALE_EPS)
    zero_point = torch.clamp(ACT_QMIN - torch.round(min_neg / scale), ACT_QMIN, ACT_QMAX).to(torch.int32)
    return scale.reshape(()), zero_point.reshape(())


def quantize_weight(weight: torch.Tensor, fold_factor: torch.Tensor | None = None) -> torch.Tensor:
    """The int8 values TFLite stores for a weight (used by tests and reports)."""
    scales = weight_scales(weight, fold_factor).reshape(-1, *([1] * (weight.dim() - 1)))
    return torch.clamp(torch.round(weight / scales), WEIGHT_QMIN, WEIGHT_QMAX).to(torch.int8)


def batchnorm_fold_factor(bn: torch.nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """|gamma| / sqrt(running_var + eps): how folding scales each output channel's weights (sign aside)."""
    gamma = bn.weight.detach().abs() if bn.affine else torch.ones_like(bn.running_var)
    return gamma / torch.sqrt(bn.running_var + bn.eps)
