"""In eval mode, a fake-quantized conv or linear computed as the int8 file computes it.

The fake-quant model in eval mode is what the exported file is checked against (``export/parity.py``).
Its convs sum dequantized values in float32 and a BatchNorm scales the sum; the file sums int8 x int8
products into int32, adds an int32 bias, and XNNPACK requantizes each output channel with one float32
multiplier, (input scale x weight scale) / output scale (its ``qs8_qc8w`` kernels' ``fp32``
requantization). The float sums' error is tiny, but it pushes values across rounding boundaries, and a
deep net carries each 1-LSB flip on: 17.5% of an efficientnet_b0's logits were an LSB or more off its
file (5 LSB at most); with its 82 layers computed here, 0.3% (1 LSB at most), and the demo model's
and mobilenet_v3_small's logits match their files to the bit.

So here: the input's integers (it is on a learned grid), the weight folded with its BN and rounded as
export folds and rounds it, the bias on its int32 grid, exact sums, and XNNPACK's multiplier, onto the
chain's output grid (or the concatenation's, where the converter writes the layer onto it). The BN
module still runs after the layer, so the result is mapped back in front of it: the BN brings it onto
the grid value within float error, and the chain's output fake-quant rounds it there exactly. Training is untouched (batch statistics, float sums, straight-through gradients).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from sparselite.quantization.fake_quant import LEARNED_RANGE_ATTR, ActivationFakeQuant
from sparselite.quantization.fusion import batchnorm_affine
from sparselite.quantization.spec import ACT_QMAX, ACT_QMIN, WEIGHT_QMAX, WEIGHT_QMIN, activation_qparams, weight_scales

# Integers in float32 are exact up to 2^24: sums that cannot pass it run in float32 (oneDNN's fast
# kernels), larger ones in float64.
_FLOAT32_EXACT = 2**24

# (input, weight, bias or None) -> the layer's output: its conv or linear, without fake-quant.
Compute = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _unseen(function):
    """This arithmetic is the simulator's, not the model's: the op-sites mode (``functional_ops``), active
    during the model's forward, would take its adds and muls for the model's own call sites and
    fake-quantize them. Torch function handling (that mode's hook) is off while it runs."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        with torch._C.DisableTorchFunction():
            return function(*args, **kwargs)

    return run


@_unseen
def with_float_gradient(out: torch.Tensor, as_file: torch.Tensor | None) -> torch.Tensor:
    """The file's values where known (else ``out``), with the float computation's gradient when one is
    wanted (eval mode with gradients on: saliency, adversarial examples)."""
    if as_file is None:
        return out
    if not (torch.is_grad_enabled() and out.requires_grad):
        return as_file
    return out + (as_file - out).detach()


@_unseen
@torch.no_grad()
def int8_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                batchnorm: nn.modules.batchnorm._BatchNorm | None, output_quant: ActivationFakeQuant | None,
                compute: Compute, channel_dim: int, tflite_kernel: bool = False) -> torch.Tensor | None:
    """The layer's output as the file holds it, in front of ``batchnorm`` (the BN export folds into it),
    on its output's grid, or on the concatenation's that the converter writes it onto
    (``rounded_by_consumer``); None where the file's arithmetic is not known here: an input on no
    learned grid, a grid not learned yet, a BN without running statistics. ``weight``: output channels
    first. ``tflite_kernel``: the file runs the layer on TFLite's kernel, not XNNPACK's (a large depthwise
    conv: ``spec.depthwise_on_tflite_kernel``). For eval mode with QAT active: the caller checks."""
    min_max = getattr(x, LEARNED_RANGE_ATTR, None)
    grid = output_quant
    if output_quant is not None and output_quant.rounded_by_consumer:
        grid = output_quant.__dict__.get("consumer_quant")  # absent in a module pickled before it existed
    if (min_max is None or grid is None or not output_quant.enabled or not grid.enabled or not grid.initialized
            or (batchnorm is not None and batchnorm.running_var is None)):
        return None
    input_scale, _ = activation_qparams(min_max[0], min_max[1])
    folded_weight, folded_bias = _folded(weight.detach(), None if bias is None else bias.detach(), batchnorm)
    weight_scale = weight_scales(folded_weight)
    per_channel = (-1,) + (1,) * (weight.dim() - 1)
    # Both in float64, as the converter rounds them: in float32, the demo model's file differed in 1 of
    # 1.07M weights and 1 of 3,000 int32 biases (a tie either way), and 4% of its logits by an LSB.
    weight_scale64 = weight_scale.double()
    weight_ints = torch.round(folded_weight.double() / weight_scale64.reshape(per_channel))
    weight_ints = weight_ints.clamp_(WEIGHT_QMIN, WEIGHT_QMAX)
    bias_ints = torch.round(folded_bias.double() / (input_scale.double() * weight_scale64))
    # q - zero point, exactly: x is on this grid.
    input_ints = torch.mul(x.detach().float(), 1.0 / input_scale).round_()

    weight_sums = weight_ints.abs().reshape(weight.shape[0], -1).sum(1)
    largest_sum = weight_sums.max() * input_ints.abs().max() + bias_ints.abs().max()
    exact = torch.float32 if largest_sum < _FLOAT32_EXACT else torch.float64
    with torch.autocast(x.device.type, enabled=False):  # mixed precision would round the sums
        sums = compute(input_ints.to(exact), weight_ints.to(exact), None)
    channels = [1] * sums.dim()
    channels[channel_dim] = -1
    sums = sums.add_(bias_ints.to(exact).reshape(channels))

    output_scale, output_zero_point = grid.qparams()
    # The zero point stays out (q - zero point is clamped).
    if tflite_kernel:
        multiplier = (input_scale.float().double() * weight_scale.float().double()) / output_scale.float().double()
        q = _fixed_point_requantized(sums, multiplier.reshape(channels))
    else:  # float32, as XNNPACK computes it
        multiplier = (input_scale.float() * weight_scale.float()) / output_scale.float()
        q = sums.float().mul_(multiplier.reshape(channels)).round_()
    q = q.clamp_(ACT_QMIN - output_zero_point, ACT_QMAX - output_zero_point)
    value = q.mul_(output_scale.float())  # (q - zero point) x scale: the real value the file holds
    if batchnorm is not None:
        value = _before_batchnorm(value, batchnorm, channels)
    return value.to(x.dtype)


def _fixed_point_requantized(sums: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """Integer ``sums`` (exact, in a float dtype) times ``multiplier`` (float64, per channel) as TFLite's
    optimized int8 depthwise kernel requantizes: the multiplier as a 31-bit fixed-point mantissa and a
    power of two (``QuantizeMultiplier``), a rounding doubling high multiply (ties away from zero), then a
    shift right that rounds ties up (found by measuring, not read in its source). XNNPACK's float32 multiply
    differs near ties. Measured on mixnet_s's 7x7 depthwise convs (stride 1 and 2, no activation, 110,592 outputs):
    this missed none; a shift with ties away from zero (``RoundingDivideByPOT``, as in
    ``MultiplyByQuantizedMultiplier``) missed 0.18%, on negative ties only, which a ReLU after the conv hides."""
    mantissa, exponent = torch.frexp(multiplier)
    fixed = torch.round(mantissa * 2.0**31).long()
    carry = fixed == 2**31
    fixed, exponent = torch.where(carry, fixed // 2, fixed), torch.where(carry, exponent + 1, exponent).long()
    left, right = exponent.clamp(min=0), (-exponent).clamp(min=0)
    product = torch.bitwise_left_shift(sums.long(), left) * fixed  # the sums are exact integers
    nudge = torch.where(product >= 0, 2**30, 1 - 2**30)
    high = torch.div(product + nudge, 2**31, rounding_mode="trunc")  # SaturatingRoundingDoublingHighMul
    half = torch.where(right > 0, torch.bitwise_left_shift(torch.ones_like(right), (right - 1).clamp(min=0)), 0)
    return torch.bitwise_right_shift(high + half, right).float()  # an arithmetic shift: floor, so ties go up


@_unseen
@torch.no_grad()
def normalization_int8_output(x: torch.Tensor, batchnorm: nn.BatchNorm2d,
                              output_quant: ActivationFakeQuant | None) -> torch.Tensor | None:
    """A BatchNorm2d that follows no conv, as the depthwise 1x1 conv export writes for it
    (``fusion.batchnorm_as_depthwise``: its gain the weight, its shift the bias)."""
    gain, shift = batchnorm_affine(batchnorm)
    return int8_output(x, gain.reshape(-1, 1, 1, 1), shift, None, output_quant, _depthwise, 1)


def _depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(x, weight, bias, groups=weight.shape[0])


def _folded(weight: torch.Tensor, bias: torch.Tensor | None, batchnorm: nn.modules.batchnorm._BatchNorm | None):
    """The weight and bias export writes: the BN folded as ``fusion.fold_batchnorm`` folds it."""
    if batchnorm is None:
        return weight, bias if bias is not None else weight.new_zeros(weight.shape[0])
    folded_weight, folded_bias = fuse_conv_bn_weights(
        weight, bias, batchnorm.running_mean, batchnorm.running_var, batchnorm.eps,
        batchnorm.weight if batchnorm.affine else None, batchnorm.bias if batchnorm.affine else None)
    return folded_weight.detach(), folded_bias.detach()


def _before_batchnorm(value: torch.Tensor, batchnorm: nn.modules.batchnorm._BatchNorm,
                      channels: list[int]) -> torch.Tensor:
    """What the eval-mode BN maps onto ``value``; a channel the BN zeroes outputs its shift whatever comes in."""
    gain, shift = batchnorm_affine(batchnorm)  # eval-mode BN: x * gain + shift
    before = value.sub_(shift.reshape(channels)).div_(torch.where(gain == 0, 1.0, gain).reshape(channels))
    if bool((gain == 0).any()):
        before = torch.where((gain == 0).reshape(channels), 0.0, before)
    return before
