"""What XNNPACK does to the float input of a dynamic-range layer, in torch.

A dynamic-range FULLY_CONNECTED or CONV_2D (int8 weights read directly by the op) runs on XNNPACK's
"qd8" kernels: the float input is quantized to int8 at run time, per row, with the row's own range, then
multiplied in int8 and rescaled to float. A "row" is what XNNPACK calls a batch element of the convert:
one vector of the last dimension for FULLY_CONNECTED (a token of a transformer, a time step of an RNN),
one whole image (H x W x C) for CONV_2D, but one pixel for a 1x1 stride-1 CONV_2D, which XNNPACK
runs as a fully connected layer, and so one patch for a patch embedding, which export writes as
SPACE_TO_DEPTH and such a conv (``spec.non_overlapping_patches``).

The parameters follow XNNPACK's ``xnn_qd8_asymmetric_quantization_params`` (``src/xnnpack/quantization.h``):
the range is widened to hold 0; ``inv_scale = 255 / (max - min)`` in float32 (1 when the range is empty);
the zero point is taken from the end with the smaller error, clamped to [-128, 127] and rounded half to
even (``lrintf``); values are ``clamp(round(x * inv_scale) + zero_point, -128, 127)``, rounded half to
even. On CPUs where XNNPACK picks its unsigned ("qdu8") kernels, every value and the zero point are 128
higher: the same grid.

``fake_quantize_rows`` returns the dequantized values, with a straight-through gradient, so QAT can
train through it and the export's parity reference can compute what the file computes.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from sparselite.quantization.recurrent_steps import steps_forward, stepwise
from sparselite.quantization.spec import non_overlapping_patches

QMIN, QMAX = -128.0, 127.0


def fake_quantize_rows(x: torch.Tensor, row_dims: tuple[int, ...]) -> torch.Tensor:
    """``x`` quantized as XNNPACK's dynamic quantization does, each row spanning dimensions ``row_dims``
    (``(-1,)`` for a linear layer's input, ``(1, 2, 3)`` for a conv's whole image, ``(1,)`` for a 1x1
    conv's pixel), and dequantized."""
    values = x.detach().float()
    low = values.amin(dim=row_dims, keepdim=True).clamp(max=0.0)
    high = values.amax(dim=row_dims, keepdim=True).clamp(min=0.0)
    empty = low == high
    inv_scale = torch.where(empty, 1.0, (QMAX - QMIN) / torch.where(empty, 1.0, high - low))
    descaled_low, descaled_high = low * inv_scale, high * inv_scale
    from_low = (QMIN + descaled_low) + (QMAX + descaled_high) > 0
    zero_point = torch.where(from_low, QMIN - descaled_low, QMAX - descaled_high).clamp(QMIN, QMAX).round()
    quantized = (values * inv_scale).round().add(zero_point).clamp(QMIN, QMAX)
    dequantized = ((quantized - zero_point) / inv_scale).to(x.dtype)
    return x + (dequantized - x).detach()


def row_dims_of(module: nn.Module) -> tuple[int, ...] | None:
    """The dimensions of the module's input that make one row of XNNPACK's dynamic quantization; None
    for a layer that runs in no dynamic-range kernel: a conv whose groups each read one channel is a
    DEPTHWISE_CONV_2D in the file (a depthwise conv, and also a stem over one channel), which has none.
    XNNPACK runs a 1x1 stride-1 unpadded conv as a fully connected layer over pixels, so each pixel is a
    row there (measured: either rule alone is 30-40 times further from the file than the right one)."""
    if isinstance(module, nn.Linear):
        return (-1,)
    if not isinstance(module, nn.Conv2d) or module.in_channels // module.groups == 1:
        return None
    unpadded = isinstance(module.padding, str) or not any(module.padding)  # 'same' pads a 1x1 kernel by 0
    pointwise = module.kernel_size == (1, 1) and module.stride == (1, 1) and module.groups == 1 and unpadded
    return (1,) if pointwise else (1, 2, 3)


def _padding(module: nn.Module) -> tuple[int, int] | None:
    if not isinstance(module, nn.Conv2d) or module.padding == "same" or module.padding_mode != "zeros":
        return None
    return (0, 0) if module.padding == "valid" else tuple(module.padding)


def _patch_size(module: nn.Module, x: torch.Tensor) -> int | None:
    """The side of the patches a patch-embedding conv reads from ``x`` (``spec.non_overlapping_patches``), else
    None. A padded one too: the converter writes its padding as a PAD, and XNNPACK quantizes the padded input."""
    padding = _padding(module)
    if padding is None or module.groups != 1 or x.dim() != 4 or module.dilation != (1, 1):
        return None
    padded = (x.shape[-2] + 2 * padding[0], x.shape[-1] + 2 * padding[1])
    return module.kernel_size[0] if non_overlapping_patches(module.kernel_size, module.stride, padded) else None


def dynamically_quantized(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x``, the input of a dynamic-range ``module`` (``row_dims_of`` not None), rounded as XNNPACK rounds
    it at run time: per row, or per patch for a patch embedding (of the padded input: its zeros change no
    row's range, which always holds 0)."""
    patch = _patch_size(module, x)
    if patch is None:
        return fake_quantize_rows(x, row_dims_of(module))
    pad_h, pad_w = _padding(module)
    padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
    n, c, h, w = padded.shape
    patches = padded.reshape(n, c, h // patch, patch, w // patch, patch)
    rounded = fake_quantize_rows(patches, (1, 3, 5)).reshape(padded.shape)
    return rounded[..., pad_h : h - pad_h, pad_w : w - pad_w]


def quantize_inputs_dynamically(module: nn.Module) -> bool:
    """Make ``module`` round the inputs of its matrix products as XNNPACK rounds them at run time: a
    hook on a linear or conv layer's input; a GRU or LSTM computed step by step (``recurrent_steps``),
    each step's input and hidden state rounded. False for a layer with no dynamic-range kernel."""
    if stepwise(module):
        module.forward = types.MethodType(
            lambda m, x, hx=None: steps_forward(m, x, hx, round_rows=lambda v: fake_quantize_rows(v, (-1,))), module)
        return True
    if row_dims_of(module) is None:
        return False

    def rounded_input(_module: nn.Module, args: tuple) -> tuple:
        return (dynamically_quantized(module, args[0]), *args[1:])

    module.register_forward_pre_hook(rounded_input)
    return True
