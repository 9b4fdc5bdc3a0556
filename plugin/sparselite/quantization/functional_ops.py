"""Fake-quant at the outputs of functional ops (``x + y``, ``x * g``, ``torch.cat``) in eager models.

TFLite requantizes the output of every ADD, SUB, MUL and CONCATENATION, but in an eager model these
are not modules, so no hook can reach them. A ``TorchFunctionMode`` that is active only during the
model's forward sees each such call. A call site is named by the innermost module whose forward
made it, the op kind and its index among that module's calls of that kind in one forward
(``block.sparselite_op_quant.add_0``). torch.export records the same module for each aten node in
program order, so export finds the same name for each node (``export/ranges.py``).

The sites are found by one forward pass at ``prepare`` time, so their range buffers exist before a
checkpoint is restored. The same mode rounds where the file rounds on a grid nobody learns
(``int8_rounding.py``).

The mode is entered by a forward pre-hook on the root and left by its forward hook (registered with
``always_call``, so it is left even when forward raises): a hook pair is the only place a plain
``nn.Module`` offers around its whole forward without replacing the user's ``forward``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from sparselite.hook_ids import hook_ids_apart
from sparselite.quantization.fake_quant import (
    LEARNED_RANGE_ATTR, NORM_SLICE_ATTR, PRODUCER_ATTR, ActivationFakeQuant, BiasFakeQuant, GridFakeQuant, WeightFakeQuant,
)
from sparselite.quantization.int8_rounding import (
    GRID_KIND_OF, keeps_input_grid, mean_on_input_grid, nearest_interpolation, on_the_files_grid, pass_grid_on,
    requantized_as_xnnpack_does,
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

    def skip_site(self, kind: str) -> None:
        """Number the ``kind`` call now running without rounding it (export numbers every call)."""
        if not self.in_fake_quant():
            owner = self.stack[-1]
            self.counts[(owner, kind)] = self.counts.get((owner, kind), 0) + 1

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
                points[key] = ActivationFakeQuant(self.averaging_constant).to(output.device)
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
            pass_grid_on(args[0][0], output)
            return output
        if kind == "cat" and args and isinstance(args[0], (tuple, list)) and all(
                getattr(part, NORM_SLICE_ATTR, False) for part in args[0]):
            # The slices of the channels a BN reads, which folds into their convs: the file's
            # concatenation joins the BN's output, already on its grid. A call site, numbered, not rounded.
            self.sites.skip_site(kind)
            return func(*args, **(kwargs or {}))
        if self.sites.discovering:
            self.sites.count_uses(kind or getattr(func, "__name__", ""), args)
        grid_kind = GRID_KIND_OF.get(func)
        if grid_kind is not None and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            return self.on_the_files_grid(grid_kind, func, args, kwargs or {})
        if kind == "cat" and args and isinstance(args[0], (tuple, list)):
            args = (requantized_as_xnnpack_does(args[0], self.sites.next_site("cat")), *args[1:])
        output = func(*args, **(kwargs or {}))
        if kind is not None and isinstance(output, torch.Tensor) and output.is_floating_point():
            output = self.sites.on_op(kind, output)
        elif args and (keeps_input_grid(func) or nearest_interpolation(func, args, kwargs or {})):
            pass_grid_on(args[0], output)
        return output

    def on_the_files_grid(self, kind: str, func, args: tuple, kwargs: dict) -> torch.Tensor:
        if kind == "mean":
            return self.mean(func, args, kwargs)
        return on_the_files_grid(kind, func, args, kwargs, self.sites.grid)

    def mean(self, func, args: tuple, kwargs: dict) -> torch.Tensor:
        """On the input's grid, as XNNPACK's MEAN rounds; unrounded where a concatenation rounds it."""
        x, site = args[0], self.sites.mean_site()
        min_max = getattr(x, LEARNED_RANGE_ATTR, None)
        if min_max is None or not self.sites.grid.enabled or (site is not None and site.rounded_by_consumer):
            out = func(*args, **kwargs)
        else:
            out = mean_on_input_grid(func, args, kwargs, (float(min_max[0]), float(min_max[1])))
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
    the concatenation's): some logits end an LSB off the file. Its fake-quant keeps observing (the range is still exported, and folded away by the
    converter) but leaves the rounding to the concatenation, whose fake-quant it names
    (``consumer_quant``: the grid a layer's eval-mode int8 arithmetic writes on, ``int8_layer``)."""
    for quant, kinds in uses.items():
        quant.rounded_by_consumer = kinds == ["cat"]
        if quant.rounded_by_consumer and isinstance(quant, ActivationFakeQuant):
            key = concatenation_of.get(quant)
            quant.__dict__["consumer_quant"] = points[key] if points is not None and key in points else None



def _enter(sites: OpSites, module: nn.Module, args: tuple) -> None:
    sites.enter_module(module)



def _exit(sites: OpSites, module: nn.Module, args: tuple, output: Any) -> None:
    sites.exit_module(module)



def _begin(sites: OpSites, module: nn.Module, args: tuple) -> None:
    sites.begin_forward()



def _end(sites: OpSites, module: nn.Module, args: tuple, output: Any) -> None:
    sites.end_forward()



HOOK_FUNCTIONS = (_enter, _exit, _begin, _end)


def op_sites_from_state_dict(averaging_constant: float, module: nn.Module, state_dict: dict, prefix: str,
                             *args: Any) -> None:
    """A load_state_dict pre-hook on the root: a fake-quant for each op site the state_dict holds that
    the model has not found yet (a run whose sites are found at its first batch, resumed from a
    checkpoint), so that the learned ranges load; the first batch's forward then finds them in place."""
    marker = f"{prefix}{OP_QUANT}."
    keys = {key[len(marker):].rsplit(".", 1)[0] for key in state_dict if key.startswith(marker)}
    points = module._modules.get(OP_QUANT)
    missing = sorted(key for key in keys if points is None or key not in points)
    if not missing:
        return
    if points is None:
        points = nn.ModuleDict()
        module.add_module(OP_QUANT, points)
    device = next(iter(module.buffers()), torch.empty(0)).device
    for key in missing:
        points[key] = ActivationFakeQuant(averaging_constant).to(device)


LOAD_HOOK_FUNCTIONS = (op_sites_from_state_dict,)


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
    return [f"{OP_QUANT}.{key}" for key in model._modules.get(OP_QUANT, {})]

