"""Fake-quant at the outputs of functional ops (``x + y``, ``x * g``, ``torch.cat``) in eager models,
and rounding wherever else the int8 file rounds.

TFLite requantizes the output of every ADD, SUB, MUL and CONCATENATION, but in an eager model these
are not modules, so no hook can reach them. A ``TorchFunctionMode`` that is active only during the
model's forward sees each such call. A call site is named by the innermost module whose forward
made it, the op kind and its index among that module's calls of that kind in one forward
(``block.sparselite_op_quant.add_0``). torch.export records the same module for each aten node in
program order, so export finds the same name for each node (``ranges.py``).

The sites are found by one forward pass at ``prepare`` time, so their range buffers exist before a
checkpoint is restored.

The same mode rounds where the file rounds on a grid nobody learns, so that training computes what
the file computes (no state: nothing to save):
  - sigmoid, tanh and softmax outputs, on the grid TFLite fixes for them (``spec.FIXED_OUTPUT_QPARAMS``;
    ``nn.Sigmoid`` calls ``torch.sigmoid``); SiLU as export writes it, ``x * sigmoid(x)`` with the
    sigmoid on that grid;
  - a mean or average pooling of a fake-quantized value, on its input's grid (TFLite's int8 MEAN and
    AVERAGE_POOL_2D keep the input's scale);
  - a clamp (hardtanh, relu6, ``clamp``) of a fake-quantized value, on its input's grid: its bounds
    are rounded onto it;
  - the insides of hardsigmoid and hardswish as export writes them, ``relu6(x + 3) / 6`` (times x),
    each step on the range export derives from x's learned range (``export/ranges.py``).
Each fake-quantized activation carries the learned range it was rounded with
(``fake_quant.LEARNED_RANGE_ATTR``): that is how the op after it finds its grid.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from sparselite.hook_ids import hook_ids_apart
from sparselite.quantization.fake_quant import (
    LEARNED_RANGE_ATTR, PRODUCER_ATTR, ActivationFakeQuant, BiasFakeQuant, GridFakeQuant, WeightFakeQuant,
)
from sparselite.quantization.spec import (
    ACT_QMAX, ACT_QMIN, FIXED_OUTPUT_QPARAMS, SHARES_INPUT_RANGE, SPLITS, activation_qparams, average_as_depthwise,
)

OP_QUANT = "sparselite_op_quant"
_FAKE_QUANT_TYPES = (ActivationFakeQuant, WeightFakeQuant, BiasFakeQuant)

# Python-level callables -> the op kind TFLite requantizes (the aten op torch.export records).
_KIND_OF = {}
for _kind, _names in {
    "add": ("add", "add_", "__add__", "__iadd__", "__radd__"),
    "sub": ("sub", "sub_", "__sub__", "__isub__"),
    "mul": ("mul", "mul_", "__mul__", "__imul__", "__rmul__"),
    "cat": ("cat", "concat", "concatenate"),
}.items():
    for _name in _names:
        for _owner in (torch.Tensor, torch):
            if hasattr(_owner, _name):
                _KIND_OF[getattr(_owner, _name)] = _kind

# Python-level callables whose int8 output the file rounds on a grid no one learns: one TFLite fixes
# (SiLU: its inner sigmoid's), or one derived from the input's learned range.
_GRID_KIND_OF = {}
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
        _GRID_KIND_OF[_function] = _kind

# The grids TFLite fixes, as the (min, max) ranges that give them (spec.activation_qparams).
_FIXED_RANGES = {kind: torch.tensor([(ACT_QMIN - zero_point) * scale, (ACT_QMAX - zero_point) * scale])
                 for kind, (scale, zero_point) in FIXED_OUTPUT_QPARAMS.items()}

# aten op base names -> the same kinds, for export.
# (export.quantizer.op_kind names in-place ops by their out-of-place kind.)
ATEN_KINDS = {"add": "add", "sub": "sub", "mul": "mul", "cat": "cat", "concat": "cat"}


def site_name(owner: str, kind: str, index: int) -> str:
    """The range's key in ``learned_ranges``: the fake-quant module's path
    (``sparselite_op_quant.layer1/0/add_0`` for the first add in ``layer1.0``'s forward).

    Every site's fake-quant sits in one registry on the root, keyed by the calling module's path with
    '/' for '.' (a module name cannot hold a '.'). Not in the calling module itself: a container that
    runs its children in its own forward (DenseNet's ``_DenseBlock``, an ``nn.ModuleDict`` whose
    forward concatenates what each child returns) would run that child too."""
    return f"{OP_QUANT}.{_site_key(owner, kind, index)}"


def _site_key(owner: str, kind: str, index: int) -> str:
    return f"{owner.replace('.', '/') + '/' if owner else ''}{kind}_{index}"


def _moved_site_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """A load_state_dict pre-hook: checkpoints written when each site's fake-quant sat in its calling
    module (``layer1.0.sparselite_op_quant.add_0.min_max``) load into the root's registry."""
    marker = f".{OP_QUANT}."
    for key in [k for k in state_dict if k.startswith(prefix) and marker in k[len(prefix):]]:
        owner, rest = key[len(prefix):].split(marker, 1)
        state_dict[f"{prefix}{OP_QUANT}.{owner.replace('.', '/')}/{rest}"] = state_dict.pop(key)


class _MeanSite:
    """A mean (or average pooling) call. No state: whether its one reader is a concatenation, found at
    prepare; the converter then writes the MEAN straight onto the concatenation's grid, so the
    concatenation rounds it, once (as ``ActivationFakeQuant.rounded_by_consumer``)."""

    def __init__(self) -> None:
        self.rounded_by_consumer = False


class OpSites:
    """Tracks which module is running and numbers the functional ops each one calls."""

    def __init__(self, model: nn.Module, averaging_constant: float, grid: GridFakeQuant) -> None:
        self.root = model
        self.names = {module: name for name, module in model.named_modules()}
        self.averaging_constant = averaging_constant
        self.grid = grid
        self.stack: list[nn.Module] = []
        self.counts: dict[tuple[nn.Module, str], int] = {}
        self.discovering = False
        self.uses: dict[ActivationFakeQuant | _MeanSite, list[str]] = {}  # filled during discovery
        self.concatenation_of: dict[ActivationFakeQuant | _MeanSite, str] = {}  # the cat site reading each
        self.means: dict[str, _MeanSite] = {}
        self.mode: _OpMode | None = None

    def enter_module(self, module: nn.Module) -> None:
        self.stack.append(module)

    def exit_module(self, module: nn.Module) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    def begin_forward(self) -> None:
        self.counts.clear()
        self.stack.clear()
        self.mode = _OpMode(self)
        self.mode.__enter__()

    def end_forward(self) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None

    def in_fake_quant(self) -> bool:
        """Whether the running call is a fake-quant module's own arithmetic (or outside any module)."""
        return not self.stack or isinstance(self.stack[-1], _FAKE_QUANT_TYPES)

    def count_uses(self, kind: str, args: tuple) -> None:
        """Discovery: which call reads each fake-quantized value (``PRODUCER_ATTR``), outside the
        fake-quant modules' own arithmetic."""
        if self.in_fake_quant():
            return
        for arg in args:
            for value in arg if isinstance(arg, (tuple, list)) else (arg,):
                producer = getattr(value, PRODUCER_ATTR, None) if isinstance(value, torch.Tensor) else None
                if producer is not None:
                    self.uses.setdefault(producer, []).append(kind)
                    if kind == "cat":
                        self.concatenation_of[producer] = self._upcoming_key(kind)

    def _upcoming_key(self, kind: str) -> str:
        owner = self.stack[-1]
        return _site_key(self.names[owner], kind, self.counts.get((owner, kind), 0))

    def next_site(self, kind: str) -> ActivationFakeQuant | None:
        """The fake-quant of the ``kind`` call about to run, if it has one (the counter is not moved)."""
        if self.in_fake_quant():
            return None
        points = self.root._modules.get(OP_QUANT)
        key = self._upcoming_key(kind)
        return points[key] if points is not None and key in points else None

    def mean_site(self) -> _MeanSite | None:
        """The mean call now running (numbered as the call sites are; made during discovery)."""
        if self.in_fake_quant():
            return None
        owner = self.stack[-1]
        index = self.counts.get((owner, "mean"), 0)
        self.counts[(owner, "mean")] = index + 1
        key = _site_key(self.names[owner], "mean", index)
        if self.discovering and key not in self.means:
            self.means[key] = _MeanSite()
        return self.means.get(key)

    def on_op(self, kind: str, output: torch.Tensor) -> torch.Tensor:
        if self.in_fake_quant():
            return output
        owner = self.stack[-1]
        index = self.counts.get((owner, kind), 0)
        self.counts[(owner, kind)] = index + 1
        points = self.root._modules.get(OP_QUANT)
        key = _site_key(self.names[owner], kind, index)
        if self.discovering:
            if points is None:
                points = nn.ModuleDict()
                self.root.add_module(OP_QUANT, points)
            if key not in points:
                points[key] = ActivationFakeQuant(self.averaging_constant)
        if points is None or key not in points:
            return output
        return points[key](output)


class _OpMode(TorchFunctionMode):
    def __init__(self, sites: OpSites) -> None:
        super().__init__()
        self.sites = sites

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = _KIND_OF.get(func)
        if kind == "cat" and args and isinstance(args[0], (tuple, list)) and len(args[0]) == 1:
            # A concatenation of one value (DenseNet's first layer concatenates the block input alone)
            # is that value: export drops it (``quantizer.decompose_for_int8``), so it is no call site.
            output = func(*args, **(kwargs or {}))
            _pass_grid_on(args[0][0], output)
            return output
        if self.sites.discovering:
            self.sites.count_uses(kind or getattr(func, "__name__", ""), args)
        grid_kind = _GRID_KIND_OF.get(func)
        if grid_kind is not None and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            return self.on_the_files_grid(grid_kind, func, args, kwargs or {})
        if kind == "cat" and args and isinstance(args[0], (tuple, list)):
            args = (_requantized_as_xnnpack_does(args[0], self.sites.next_site("cat")), *args[1:])
        output = func(*args, **(kwargs or {}))
        if kind is not None and isinstance(output, torch.Tensor) and output.is_floating_point():
            output = self.sites.on_op(kind, output)
        elif args and (_keeps_input_grid(func) or _nearest_interpolation(func, args, kwargs or {})):
            _pass_grid_on(args[0], output)
        return output

    def on_the_files_grid(self, kind: str, func, args: tuple, kwargs: dict) -> torch.Tensor:
        # The mode is off inside this handler: the calls below run plain.
        x, grid = args[0], self.sites.grid
        if kind == "silu":  # export's form: x * LOGISTIC(x)
            return x * grid(torch.sigmoid(x), *FIXED_OUTPUT_QPARAMS["sigmoid"])
        if kind in FIXED_OUTPUT_QPARAMS:
            out = grid(func(*args, **kwargs), *FIXED_OUTPUT_QPARAMS[kind])
            if grid.enabled:  # a conv reading a TANH has its int32 bias on this grid
                setattr(out, LEARNED_RANGE_ATTR, _FIXED_RANGES[kind])
            return out
        if kind == "mean":
            return self.mean(func, args, kwargs)
        min_max = getattr(x, LEARNED_RANGE_ATTR, None)
        if min_max is None or not grid.enabled:  # not on a grid sparselite knows (or QAT not active yet)
            out = func(*args, **kwargs)
            if kind == "clamp":
                _pass_grid_on(x, out)
            return out
        learned = (float(min_max[0]), float(min_max[1]))
        if kind == "clamp":
            # TFLite clamps int8 values at the bounds quantized onto the input's grid (a fused
            # activation's range, MINIMUM/MAXIMUM with a constant); the float clamp's bound 1.0 or 6.0
            # sits between two grid values (10 LSB of logits apart on a hardtanh run on a conv's output).
            out = _on_range(grid, func(*args, **kwargs), learned)
            setattr(out, LEARNED_RANGE_ATTR, min_max)
            return out
        # hardsigmoid / hardswish: relu6(x + 3), then / 6, each on the range interval arithmetic gives.
        low, high = (min(max(v + 3.0, 0.0), 6.0) for v in learned)
        shifted = _on_range(grid, torch.clamp(x + 3.0, 0.0, 6.0), (low, high))
        gate = shifted * (1.0 / 6.0)
        if kind == "hardsigmoid":
            return gate  # the module's own output fake-quant rounds it
        return x * _on_range(grid, gate, (low / 6.0, high / 6.0))

    def mean(self, func, args: tuple, kwargs: dict) -> torch.Tensor:
        """On the input's grid, as XNNPACK's MEAN rounds; unrounded where a concatenation rounds it."""
        x, site = args[0], self.sites.mean_site()
        min_max = getattr(x, LEARNED_RANGE_ATTR, None)
        if min_max is None or not self.sites.grid.enabled or (site is not None and site.rounded_by_consumer):
            out = func(*args, **kwargs)
        else:
            out = _mean_on_input_grid(func, args, kwargs, (float(min_max[0]), float(min_max[1])))
            setattr(out, LEARNED_RANGE_ATTR, min_max)  # TFLite's int8 MEAN keeps its input's scale
        if self.sites.discovering and site is not None:
            setattr(out, PRODUCER_ATTR, site)
        return out


def fold_into_concatenations(uses: dict[ActivationFakeQuant | _MeanSite, list[str]],
                             concatenation_of: dict[ActivationFakeQuant | _MeanSite, str],
                             points: nn.ModuleDict | None) -> None:
    """A value whose one reader is a concatenation is written by its op straight onto the
    concatenation's grid: the converter folds the requantization between them into the producer (a
    SqueezeNet fire module's two expand convs write the concatenation's scale; CBAM's channel mean is
    written by its MEAN). The file rounds it once, where training rounded it twice (its own range, then
    the concatenation's): 5-25% of a fire block's logits were off the file by an LSB, 18% of a CBAM
    block's. Its fake-quant keeps observing (the range is still exported, and folded away by the
    converter) but leaves the rounding to the concatenation, whose fake-quant it names
    (``consumer_quant``: the grid a layer's eval-mode int8 arithmetic writes on, ``int8_layer``)."""
    for quant, kinds in uses.items():
        quant.rounded_by_consumer = kinds == ["cat"]
        if quant.rounded_by_consumer and isinstance(quant, ActivationFakeQuant):
            key = concatenation_of.get(quant)
            quant.__dict__["consumer_quant"] = points[key] if points is not None and key in points else None


def _requantized_as_xnnpack_does(inputs, site: ActivationFakeQuant | None) -> list:
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
def _keeps_input_grid(func) -> bool:
    """A call TFLite's int8 form keeps on its input's grid (``spec.SHARES_INPUT_RANGE``, by base name:
    ``Tensor.view``, ``F.max_pool2d``'s ``_max_pool2d``, in-place ``relu_``), or a slice of it."""
    name = getattr(func, "__name__", "").strip("_")
    return name in SHARES_INPUT_RANGE or name in SPLITS or name == "getitem"


def _nearest_interpolation(func, args: tuple, kwargs: dict) -> bool:
    """``F.interpolate(x, mode="nearest")``: copies of x's values (a RESIZE_NEAREST_NEIGHBOR on x's grid)."""
    return func is F.interpolate and kwargs.get("mode", args[3] if len(args) > 3 else "nearest") == "nearest"


def _pass_grid_on(source: Any, output: Any) -> None:
    """Tag ``output`` (or each tensor of a split) with the learned range ``source`` was rounded with, so
    that a layer after a reshape or a pooling still finds its input's grid (its int32 bias is on it)."""
    min_max = getattr(source, LEARNED_RANGE_ATTR, None) if isinstance(source, torch.Tensor) else None
    if min_max is None:
        return
    for out in output if isinstance(output, (tuple, list)) else (output,):
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out is not source:
            setattr(out, LEARNED_RANGE_ATTR, min_max)


def _mean_on_input_grid(func, args: tuple, kwargs: dict, learned: tuple[float, float]) -> torch.Tensor:
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
    windows = _window_sizes(func, args, kwargs, out)
    if windows is not None:
        as_conv = torch.tensor([average_as_depthwise(int(w)) for w in windows.flatten()]).reshape(windows.shape)
        q = torch.where(as_conv, torch.round(averaged) + zero_point, q)
    q = q.clamp_(ACT_QMIN, ACT_QMAX)
    return out + ((q - zero_point) * scale.to(out.dtype) - out).detach()


def _window_sizes(func, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor | None:
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


def _on_range(grid: GridFakeQuant, x: torch.Tensor, learned: tuple[float, float]) -> torch.Tensor:
    return grid(x, *activation_qparams(torch.tensor(learned[0]), torch.tensor(learned[1])))


def _enter(sites: OpSites, module: nn.Module, args: tuple) -> None:
    sites.enter_module(module)


def _exit(sites: OpSites, module: nn.Module, args: tuple, output: Any) -> None:
    sites.exit_module(module)


def _begin(sites: OpSites, module: nn.Module, args: tuple) -> None:
    sites.begin_forward()


def _end(sites: OpSites, module: nn.Module, args: tuple, output: Any) -> None:
    sites.end_forward()


HOOK_FUNCTIONS = (_enter, _exit, _begin, _end)
LOAD_HOOK_FUNCTIONS = (_moved_site_keys,)


def attach_op_sites(model: nn.Module, example_inputs: tuple, averaging_constant: float,
                    grid: GridFakeQuant) -> list[str]:
    """Find the functional-op call sites with one forward pass and give each a fake-quant (``grid``
    rounds the ops on fixed or derived grids). Returns their names."""
    with hook_ids_apart(model):  # a pickled copy keeps its hooks when new ones come (hook_ids.py)
        sites = OpSites(model, averaging_constant, grid)
        model.register_forward_pre_hook(functools.partial(_begin, sites))
        for module in model.modules():
            module.register_forward_pre_hook(functools.partial(_enter, sites))
            module.register_forward_hook(functools.partial(_exit, sites), always_call=True)
        # Registered last so that it runs after the root's own exit hook, and even if forward raises.
        model.register_forward_hook(functools.partial(_end, sites), always_call=True)
        was_training = model.training
        sites.discovering = True
        try:
            with torch.no_grad():
                model.eval()(*example_inputs)
        finally:
            sites.discovering = False
            model.train(was_training)
        fold_into_concatenations(sites.uses, sites.concatenation_of, model._modules.get(OP_QUANT))
        model.register_load_state_dict_pre_hook(_moved_site_keys)
    return [f"{OP_QUANT}.{key}" for key in model._modules.get(OP_QUANT, {})]
