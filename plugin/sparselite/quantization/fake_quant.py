"""Fake-quant modules: float in, float out, rounded to the int8 grid TFLite will use (straight-through gradients)."""

from __future__ import annotations

import torch
from torch import nn

from sparselite.quantization.fusion import batchnorm_affine
from sparselite.quantization.spec import (
    ACT_QMAX, ACT_QMIN, WEIGHT_QMAX, WEIGHT_QMIN, activation_qparams, batchnorm_fold_factor, weight_scales,
)


# The attribute that carries, on each fake-quantized activation, the learned [min, max] buffer it was
# rounded with: ops the file computes on that grid (a pooled mean, the inside of hardswish, a layer's
# int32 bias) read it (``int8_rounding.py``, ``BiasFakeQuant``) in the same forward, before the next batch
# updates the buffer. Ops that keep their input's grid (reshapes, pooling) pass it on.
LEARNED_RANGE_ATTR = "_sparselite_learned_range"
# The attribute that names, on each value an ActivationFakeQuant returns, that fake-quant (how
# ``functional_ops`` finds which values feed a concatenation alone).
PRODUCER_ATTR = "_sparselite_fake_quant"
# On a producer's output that is one slice of the channels a BN reads after their concatenation: the BN
# folds into the producers, so the concatenation is no rounding point (``fusion.FusedChain.channels``).
NORM_SLICE_ATTR = "_sparselite_norm_slice"


class _PerTensorFakeQuant(torch.autograd.Function):
    """Bit-identical to ``torch.fake_quantize_per_tensor_affine`` (values, and gradients zeroed where
    the rounded value falls outside [qmin, qmax]), built from in-place vectorized ops. Torch's CPU
    kernel is a scalar loop about 2.5x slower, and activation fake-quant dominates QAT's step overhead.
    The zero point moves the clamp bounds instead of the values (integers are exact in float): two
    passes over the tensor fewer than adding and subtracting it.

    ``extremes``: the value's [min, max], when the caller has them. Scaling and rounding are monotonic,
    so when both land inside the bounds no element is clamped and the gradient passes everywhere: the
    mask (two comparisons in the forward, a masked_fill in the backward, most of the activation
    fake-quant's cost) is built only when some element is clamped."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, extremes=None):
        low, high = qmin - zero_point, qmax - zero_point
        on_cpu = x.device.type == "cpu"
        if on_cpu:  # a 0-d tensor bound makes CPU clamp ~15% slower; elsewhere float() would sync
            low, high = float(low), float(high)
        inverse = 1.0 / scale
        q = torch.mul(x, inverse).round_()
        ctx.clamps_nothing = not ctx.needs_input_grad[0] or (
            on_cpu and extremes is not None and extremes.dtype == x.dtype
            and _inside(torch.mul(extremes, inverse).round_().tolist(), low, high))
        if not ctx.clamps_nothing:
            ctx.save_for_backward((q < low).logical_or_(q > high))
        return q.clamp_(low, high).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        if ctx.clamps_nothing:
            return grad, None, None, None, None, None
        (outside,) = ctx.saved_tensors
        return grad.masked_fill(outside, 0.0), None, None, None, None, None


def _inside(rounded_extremes: list[float], low: float, high: float) -> bool:
    return low <= rounded_extremes[0] and rounded_extremes[1] <= high


def fake_quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                             extremes: torch.Tensor | None = None) -> torch.Tensor:
    """``extremes``: ``x``'s [min, max] if at hand (see ``_PerTensorFakeQuant``)."""
    return _PerTensorFakeQuant.apply(x, scale, zero_point.to(x.dtype), ACT_QMIN, ACT_QMAX, extremes)


class _SymmetricWeightFakeQuant(torch.autograd.Function):
    """Bit-identical to ``torch.fake_quantize_per_channel_affine`` with zero points 0 and [-127, 127],
    for scales from ``spec.weight_scales``: those are at least amax / 127, so no weight rounds outside
    the range, torch's clamp changes nothing and its gradient mask passes everything. Torch's CPU kernel
    is a scalar loop; this is vectorized (``benchmarks/training_overhead.py`` times the QAT step)."""

    @staticmethod
    def forward(ctx, weight, scales):
        return torch.mul(weight, 1.0 / scales).round_().clamp_(WEIGHT_QMIN, WEIGHT_QMAX).mul_(scales)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class GridFakeQuant:
    """Fake-quant onto a grid given per call: one TFLite fixes for an op's output
    (``spec.FIXED_OUTPUT_QPARAMS``), or one derived from a learned range. No state to save, so not a
    module (and not a child that an ``nn.Sequential`` root would run as a layer). ``enabled``: round
    (QAT's active phases) or pass through."""

    def __init__(self) -> None:
        self.enabled = True

    def __call__(self, x: torch.Tensor, scale: float | torch.Tensor, zero_point: int | torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return fake_quantize_per_tensor(x, torch.as_tensor(scale, dtype=x.dtype), torch.as_tensor(zero_point))


class WeightFakeQuant(nn.Module):
    """Per-channel symmetric fake-quant of a weight; no state, since the scale follows the current weights.

    ``batchnorm``: the BN that export will fold into this weight, so the simulated scale is the one
    export computes on the folded weight (see ``spec.weight_scales``).
    """

    def __init__(self, batchnorm: nn.modules.batchnorm._BatchNorm | None = None) -> None:
        super().__init__()
        self.enabled = True
        # Kept out of nn.Module's registry: the BN belongs to the model, not to this quantizer
        # (registering it would duplicate it in state_dict). Deep copies still remap it.
        self.__dict__["batchnorm"] = batchnorm

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        fold_factor = batchnorm_fold_factor(self.batchnorm) if self.batchnorm is not None else None
        scales = weight_scales(weight, fold_factor).to(weight.dtype)
        return _SymmetricWeightFakeQuant.apply(weight, scales.reshape(-1, *([1] * (weight.dim() - 1))))


class BiasFakeQuant(nn.Module):
    """TFLite's int32 bias, in eval mode: the file adds the bias, folded with the BN, rounded to the
    grid input scale x folded weight scale of each output channel. That grid is coarse next to the
    output's (a tenth of an output LSB in a depthwise conv), and the rounding pushes values across
    the output's rounding boundaries: a mobilenet_v2 whose fake-quant model skipped it missed its file
    by 9 output LSBs (2 with it). In training, BatchNorm's batch statistics stand in for the fold the
    bias belongs to, so there is nothing to simulate. No state, like the weight's. Where the layer's
    whole int8 arithmetic is computed as the file's (``int8_layer``), this is not called.

    ``batchnorm``: the BN that export will fold into the layer (see ``WeightFakeQuant``).
    """

    def __init__(self, batchnorm: nn.modules.batchnorm._BatchNorm | None = None) -> None:
        super().__init__()
        self.enabled = True
        self.__dict__["batchnorm"] = batchnorm  # the model's, not this quantizer's (see WeightFakeQuant)

    def forward(self, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                channel_dim: int) -> torch.Tensor:
        """``out``, the layer's output for input ``x``, plus the rounding, when ``x`` is on a known int8
        grid (``LEARNED_RANGE_ATTR``)."""
        min_max = getattr(x, LEARNED_RANGE_ATTR, None)
        if self.training or not self.enabled or min_max is None:
            return out
        rounding = self.rounding(weight, bias, activation_qparams(min_max[0], min_max[1])[0])
        return out + rounding.reshape(-1, *([1] * (out.dim() - channel_dim % out.dim() - 1)))

    @torch.no_grad()
    def rounding(self, weight: torch.Tensor, bias: torch.Tensor | None, input_scale: torch.Tensor) -> torch.Tensor:
        """Per output channel, what the int32 bias adds to the layer's output, in front of its BN."""
        bias = bias.detach() if bias is not None else weight.new_zeros(weight.shape[0])
        if self.batchnorm is None:
            folded, gain, weight_scale = bias, torch.ones_like(bias), weight_scales(weight)
        else:
            bn = self.batchnorm
            gain = torch.rsqrt(bn.running_var + bn.eps) * (bn.weight.detach() if bn.affine else 1.0)
            folded = (bias - bn.running_mean) * gain + (bn.bias.detach() if bn.affine else 0.0)
            factor = batchnorm_fold_factor(bn)
            weight_scale = weight_scales(weight, factor) * factor
        grid = input_scale * weight_scale
        error = torch.round(folded / grid) * grid - folded
        # Mapped back through the BN's gain; a channel the BN zeroes has nothing to add.
        return torch.where(gain.abs() > 1e-12, error / torch.where(gain == 0, 1.0, gain), 0.0).to(weight.dtype)


class BatchNormShiftFakeQuant(BiasFakeQuant):
    """A BatchNorm2d that follows no conv, which export writes as a depthwise 1x1 conv
    (``fusion.batchnorm_as_depthwise``): in eval mode, its shift added as that conv adds its int32
    bias, rounded to input scale x weight scale per channel. The arithmetic runs in this module, a
    fake-quant, so that ``functional_ops`` does not take it for the model's own ops."""

    def __init__(self, normalization: nn.BatchNorm2d) -> None:
        super().__init__()
        self.__dict__["normalization"] = normalization  # the model's, not this quantizer's (see WeightFakeQuant)

    def forward(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.enabled:
            return out
        gain, shift = batchnorm_affine(self.normalization)
        return super().forward(out, x, gain.reshape(-1, 1, 1, 1), shift, 1)


class ActivationFakeQuant(nn.Module):
    """Per-tensor affine fake-quant with a moving-average [min, max] (a buffer, so checkpoints keep it).

    ``observing``: update the range from each training batch; ``enabled``: round to the int8 grid.
    """

    def __init__(self, averaging_constant: float = 0.01) -> None:
        super().__init__()
        self.averaging_constant = averaging_constant
        self.register_buffer("min_max", torch.tensor([float("inf"), float("-inf")]))
        self.observing = True
        self.enabled = True
        # Set when the value's one consumer is a concatenation: the converter then writes the value
        # straight onto the concatenation's grid (no requantization in between), so the file rounds
        # it once, there (``functional_ops.fold_into_concatenations``). Not state: found at prepare.
        self.rounded_by_consumer = False
        # That concatenation's fake-quant, whose grid the value is written on (kept out of nn.Module's
        # registry: it belongs to the op-sites registry, as WeightFakeQuant's BN to the model).
        self.__dict__["consumer_quant"] = None

    @property
    def initialized(self) -> bool:
        return bool(torch.isfinite(self.min_max).all())

    @torch.no_grad()
    def observe(self, extremes: torch.Tensor) -> None:
        """Move the range towards a batch's [min, max]."""
        if not self.initialized:
            self.min_max.copy_(extremes)
        else:
            self.min_max.lerp_(extremes.float(), self.averaging_constant)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return activation_qparams(self.min_max[0], self.min_max[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The batch's extremes: observed, and they spare the gradient mask when nothing is clamped.
        wanted = self.observing or (x.requires_grad and x.device.type == "cpu")
        extremes = torch.stack(torch.aminmax(x.detach())) if self.training and wanted else None
        if self.observing and self.training:
            self.observe(extremes)
        if not self.enabled or not self.initialized or self.rounded_by_consumer:
            out = x
        else:
            scale, zero_point = self.qparams()
            out = fake_quantize_per_tensor(x, scale.to(x.dtype), zero_point, extremes)
            setattr(out, LEARNED_RANGE_ATTR, self.min_max)
        setattr(out, PRODUCER_ATTR, self)
        return out

    def extra_repr(self) -> str:
        folded = ", rounded_by_consumer=True" if self.rounded_by_consumer else ""
        return f"min_max={self.min_max.tolist()}, observing={self.observing}, enabled={self.enabled}{folded}"
