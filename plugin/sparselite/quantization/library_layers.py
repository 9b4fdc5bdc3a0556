"""Conv and linear subclasses from model libraries, recognized by what they compute, never by name.

A library subclasses ``nn.Conv2d`` or ``nn.Linear`` for reasons QAT can follow:
  - a forward that computes what its torch base computes (timm's ``Linear``, which only adds a
    TorchScript cast): quantized as the base is;
  - a forward that pads its input as TensorFlow's "SAME" does, from the input's size, then runs the
    base's conv with no padding of its own (timm's ``Conv2dSame``, EfficientNet's TF ports): quantized as
    the base is, on the padded input. The file computes the same: a PAD (zeros, the input's zero point),
    then the conv.
Anything else (a weight standardized in forward, a conv with a mask of its own) is left float-side:
its BatchNorm still folds, but QAT puts no fake-quant on it, and a strict export names its ranges.
Each check runs the module on a random input, twice for padding (an odd and an even size).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SAME_AS_BASE = "same as base"
TF_SAME_PADDING = "tf same padding"


def tf_same_pads(size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]) -> list[int]:
    """``F.pad`` widths (last dim first) for TensorFlow's SAME: the output is ceil(size / stride), and the
    odd pixel of padding goes after."""
    pads: list[int] = []
    for n, k, s, d in reversed(list(zip(size, kernel, stride, dilation))):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads += [total // 2, total - total // 2]
    return pads


def pad_tf_same(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    spatial = len(layer.kernel_size)
    return F.pad(x, tf_same_pads(tuple(x.shape[-spatial:]), layer.kernel_size, layer.stride, layer.dilation))


@torch.no_grad()
def library_form(module: nn.Module, base: type[nn.Module]) -> str | None:
    """How ``module`` (an instance of a subclass of ``base``) computes relative to ``base.forward``:
    ``SAME_AS_BASE``, ``TF_SAME_PADDING``, or None (something else)."""
    own = type(module).forward
    probes = _probes(module, base)
    try:
        if all(_close(own(module, x), base.forward(module, x)) for x in probes):
            return SAME_AS_BASE
        if base is nn.Conv2d and all(p == 0 for p in module.padding) and all(
                _close(own(module, x), base.forward(module, pad_tf_same(module, x))) for x in probes):
            return TF_SAME_PADDING
    except Exception:  # noqa: BLE001 - a forward that takes other arguments computes something else
        return None
    return None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def _probes(module: nn.Module, base: type[nn.Module]) -> list[torch.Tensor]:
    weight = module.weight
    generator = torch.Generator().manual_seed(0)
    if base is nn.Linear:
        shapes = [(2, module.in_features)]
    else:
        dims = len(module.kernel_size)
        reach = max((k - 1) * d + 1 for k, d in zip(module.kernel_size, module.dilation))
        shapes = [(1, module.in_channels) + (reach + extra,) * dims for extra in (4, 5)]  # an even and an odd size
    return [torch.randn(shape, generator=generator).to(weight.device, weight.dtype) for shape in shapes]
