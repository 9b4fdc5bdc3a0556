"""Rounding where the int8 file rounds on a grid nobody learns, so that training computes what the file
computes (no state: nothing to save). ``functional_ops._OpMode`` calls these for each torch call:
  - sigmoid, tanh and softmax outputs, on the grid TFLite fixes for them (``spec.FIXED_OUTPUT_QPARAMS``;
    ``nn.Sigmoid`` calls ``torch.sigmoid``); SiLU as export writes it, ``x * sigmoid(x)`` with the
    sigmoid on that grid;
  - a mean or average pooling of a fake-quantized value, on its input's grid (TFLite's int8 MEAN and
    AVERAGE_POOL_2D keep the input's scale);
  - a clamp (hardtanh, relu6, ``clamp``) of a fake-quantized value, on its input's grid: its bounds
    are rounded onto it;
  - the insides of hardsigmoid and hardswish as export writes them, ``relu6(x + 3) / 6`` (times x),
    each step on the range export derives from x's learned range (``export/ranges.py``);
  - the inputs of a concatenation that the file requantizes, as XNNPACK's QUANTIZE does.
Each fake-quantized activation carries the learned range it was rounded with
(``fake_quant.LEARNED_RANGE_ATTR``): that is how the op after it finds its grid.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F

from sparselite.quantization.fake_quant import LEARNED_RANGE_ATTR, ActivationFakeQuant, GridFakeQuant
from sparselite.quantization.spec import (
    ACT_QMAX, ACT_QMIN, FIXED_OUTPUT_QPARAMS, SHARES_INPUT_RANGE, SPLITS, activation_qparams, average_as_depthwise,
)

# Python-level callables whose int8 output the file rounds on a grid no one learns: one TFLite fixes
# (SiLU: its inner sigmoid's), or one derived from the input's learned range.
GRID_KIND_OF = {}
for _kind, _functions in {
    "sigmoid": (torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid),
    "tanh": (torch.tanh, torch.Tensor.tanh, F.tanh),
    "softmax": (torch.softmax, torch.Tensor.softmax, F.softmax),
    "silu": (F.silu,),
    "mean": (torch.mean, torch.Tensor.mean, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.avg_pool1d, F.avg_pool2d),
    "hardsigmoid": (F.hardsigmoid,),
    "hardswish": (F.hardswish,),
    # A clamp keeps its input's grid; the file clamps at the bounds rounded onto it.
    "clamp": (F.hardtanh, F.relu6, torch.clamp, torch.Tensor.clamp, torch.clip, torch.Tensor.clip),
}.items():
    for _function in _functions:
        GRID_KIND_OF[_function] = _kind

# The grids TFLite fixes, as the (min, max) ranges that give them (spec.activation_qparams).
FIXED_RANGES = {kind: torch.tensor([(ACT_QMIN - zero_point) * scale, (ACT_QMAX - zero_point) * scale])
                for kind, (scale, zero_point) in FIXED_OUTPUT_QPARAMS.items()}


def on_the_files_grid(kind: str, func, args: tuple, kwargs: dict, grid: GridFakeQuant) -> torch.Tensor:
    """``func(*args, **kwargs)`` rounded as the file rounds a ``kind`` call (not "mean": ``mean_on_input_grid``).
    Called with the torch-function mode off: the calls below run plain."""
    x = args[0]
    if kind == "silu":  # export's form: x * LOGISTIC(x)
        return x * grid(torch.sigmoid(x), *FIXED_OUTPUT_QPARAMS["sigmoid"])
    if kind in FIXED_OUTPUT_QPARAMS:
        out = grid(func(*args, **kwargs), *FIXED_OUTPUT_QPARAMS[kind])
        if grid.enabled:  # a conv reading a TANH has its int32 bias on this grid
            setattr(out, LEARNED_RANGE_ATTR, FIXED_RANGES[kind])
        return out
    min_max = getattr(x, LEARNED_RANGE_ATTR, None)
    if min_max is None or not grid.enabled:  # not on a grid sparselite knows (or QAT not active yet)
        out = func(*args, **kwargs)
        if kind == "clamp":
            pass_grid_on(x, out)
        return out
    learned = (float(min_max[0]), float(min_max[1]))
    if kind == "clamp":
        # TFLite clamps int8 values at the bounds quantized onto the input's grid (a fused
        # activation's range, MINIMUM/MAXIMUM with a constant); the float clamp's bound 1.0 or 6.0
        # sits between two grid values (10 LSB of logits apart on a hardtanh run on a conv's output).
        out = on_range(grid, func(*args, **kwargs), learned)
        setattr(out, LEARNED_RANGE_ATTR, min_max)
        return out
    # hardsigmoid / hardswish: relu6(x + 3), then / 6, each on the range interval arithmetic gives.
    low, high = (min(max(v + 3.0, 0.0), 6.0) for v in learned)
    shifted = on_range(grid, torch.clamp(x + 3.0, 0.0, 6.0), (low, high))
    gate = shifted * (1.0 / 6.0)
    if kind == "hardsigmoid":
        return gate  # the module's own output fake-quant rounds it
    return x * on_range(grid, gate, (low / 6.0, high / 6.0))


def requantized_as_xnnpack_does(inputs, site: ActivationFakeQuant | None) -> list:
    """In eval mode, the inputs of a concatenation that the file requantizes onto its grid (those
    rounded on a grid of their own: a slice of another value, a value read elsewhere too), each as
    XNNPACK's int8-to-int8 QUANTIZE computes it: a multiplier of 8 fractional bits,
    ``(q * round(256 * s_in / s_out) + 128) >> 8``, which misses exact rounding on about 3% of the
    values (measured on the QUANTIZE of a ShuffleNet unit: this formula matches all 256 inputs).
    In training, exact rounding (the concatenation's own fake-quant) stands in for it."""
    if site is None or site.training or not site.enabled or not site.initialized:
        return list(inputs)
    scale, zero_point = site.qparams()
    out = []
    for value in inputs:
        min_max = getattr(value, LEARNED_RANGE_ATTR, None) if isinstance(value, torch.Tensor) else None
        if min_max is None or min_max is site.min_max:
            out.append(value)
            continue
        input_scale, _ = activation_qparams(min_max[0], min_max[1])
        multiplier = torch.round(256.0 * input_scale / scale)
        if input_scale == scale or not 1 <= multiplier < 2**15:  # no QUANTIZE in the file, or another kernel
            out.append(value)
            continue
        integers = torch.round(value * (1.0 / input_scale))  # exact: the value is on its grid
        requantized = torch.floor((integers * multiplier + 128) / 256).clamp_(ACT_QMIN - zero_point, ACT_QMAX - zero_point)
        out.append(requantized * scale.to(value.dtype))
    return out



@functools.lru_cache(maxsize=None)  # called on every torch call of every forward
def keeps_input_grid(func) -> bool:
    """A call TFLite's int8 form keeps on its input's grid (``spec.SHARES_INPUT_RANGE``, by base name:
    ``Tensor.view``, ``F.max_pool2d``'s ``_max_pool2d``, in-place ``relu_``), or a slice of it."""
    name = getattr(func, "__name__", "").strip("_")
    return name in SHARES_INPUT_RANGE or name in SPLITS or name == "getitem"



def nearest_interpolation(func, args: tuple, kwargs: dict) -> bool:
    """``F.interpolate(x, mode="nearest")``: copies of x's values (a RESIZE_NEAREST_NEIGHBOR on x's grid)."""
    return func is F.interpolate and kwargs.get("mode", args[3] if len(args) > 3 else "nearest") == "nearest"



def pass_grid_on(source: Any, output: Any) -> None:
    """Tag ``output`` (or each tensor of a split) with the learned range ``source`` was rounded with, so
    that a layer after a reshape or a pooling still finds its input's grid (its int32 bias is on it)."""
    min_max = getattr(source, LEARNED_RANGE_ATTR, None) if isinstance(source, torch.Tensor) else None
    if min_max is None:
        return
    for out in output if isinstance(output, (tuple, list)) else (output,):
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out is not source:
            setattr(out, LEARNED_RANGE_ATTR, min_max)



def mean_on_input_grid(func, args: tuple, kwargs: dict, learned: tuple[float, float]) -> torch.Tensor:
    """A mean (or average pooling) of values on the grid ``learned``, rounded as the int8 file rounds it.
    The integers are averaged; then
      - where export writes the average as a depthwise conv of ones (``spec.average_as_depthwise``: the
        windows of at most 25 values), that mean is rounded half to even and the zero point added;
      - where it stays an XNNPACK MEAN, the zero point is added first and the sum rounded half to even
        (so a tie goes to the odd side when the zero point is odd: measured on a MEAN cut out of a file,
        this rule matched all of 244 ties, exact half-to-even none of them).
    The same mean taken in float lands a tie (a mean of 2x2 integers is one a quarter of the time) on
    either side by the float error of the sum. Gradients: the float mean's (straight through)."""
    out = func(*args, **kwargs)
    scale, zero_point = activation_qparams(torch.tensor(learned[0]), torch.tensor(learned[1]))
    integers = torch.round(args[0].detach() * (1.0 / scale))  # q - zero point, exactly: the input is on this grid
    averaged = func(integers, *args[1:], **kwargs)
    q = torch.round(averaged + zero_point)
    windows = window_sizes(func, args, kwargs, out)
    if windows is not None:
        as_conv = torch.tensor([average_as_depthwise(int(w)) for w in windows.flatten()]).reshape(windows.shape)
        q = torch.where(as_conv, torch.round(averaged) + zero_point, q)
    q = q.clamp_(ACT_QMIN, ACT_QMAX)
    return out + ((q - zero_point) * scale.to(out.dtype) - out).detach()



def window_sizes(func, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor | None:
    """How many values each output of an average averages, where the file writes it as a MEAN over a
    4-D value's spatial axes or an AVERAGE_POOL_2D (what ``spec.average_as_depthwise`` decides on);
    None where it writes something else: a mean over other dims, or a 1-D one (a MEAN of a 3-D value);
    a pool that leaves its padding out of the count (SAME padding), or whose last window ``ceil_mode``
    cuts short; an adaptive 1-D pool whose windows overlap (sliced MEANs of 3-D values)."""
    x = args[0]
    if func in (torch.mean, torch.Tensor.mean):
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        if x.dim() != 4 or dims is None:
            return None
        reduced = {int(d) % 4 for d in ((dims,) if isinstance(dims, int) else dims)}
        return torch.tensor(x.shape[2] * x.shape[3]) if reduced == {2, 3} else None
    spatial = 1 if func in (F.avg_pool1d, F.adaptive_avg_pool1d) else 2
    if x.dim() != spatial + 2:
        return None
    if func in (F.avg_pool1d, F.avg_pool2d):
        names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
        given = dict(zip(names, args[1:])) | kwargs
        kernel = _per_dim(given["kernel_size"], spatial)
        stride = _per_dim(given.get("stride") or kernel, spatial)
        padding = _per_dim(given.get("padding", 0), spatial)
        if given.get("divisor_override") is not None or (any(padding) and not given.get("count_include_pad", True)):
            return None
        whole_windows = [(size + 2 * p - k) // s + 1 for size, k, s, p in zip(x.shape[2:], kernel, stride, padding)]
        return torch.tensor(math.prod(kernel)) if list(out.shape[2:]) == whole_windows else None
    sizes, outputs = list(x.shape[2:]), list(out.shape[2:])
    if spatial == 1 and sizes[0] % outputs[0]:
        return None
    # torch's adaptive windows: from floor(i * n / o) to ceil((i + 1) * n / o).
    counts = [torch.tensor([-(-(i + 1) * n // o) - i * n // o for i in range(o)]) for n, o in zip(sizes, outputs)]
    return counts[0] if spatial == 1 else counts[0][:, None] * counts[1][None, :]



def _per_dim(value, dims: int) -> list[int]:
    return [int(value)] * dims if isinstance(value, int) else [int(v) for v in value]



def on_range(grid: GridFakeQuant, x: torch.Tensor, learned: tuple[float, float]) -> torch.Tensor:
    return grid(x, *activation_qparams(torch.tensor(learned[0]), torch.tensor(learned[1])))
