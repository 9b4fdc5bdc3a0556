"""Channel coupling from torch-pruning's DependencyGraph, behind sparselite's own small interface.

This is the only module that imports ``torch_pruning``. What it answers:
  - which output channels must be removed together (a *group*: conv -> BN -> act -> next conv's
    inputs; a depthwise conv follows its input; a residual add ties its inputs' channels; a concat
    maps a channel range of the next layer);
  - how important each channel of a group is (group L1/L2 norm, or BN scale);
  - how to remove channels physically, keeping every ``nn.Parameter`` object alive (its data is
    replaced), so optimizers, their state and other pruners' references stay valid.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

# Buffers that are shaped like their module's weight and must follow it when channels go
# (the unstructured pruner's mask).
WEIGHT_SHAPED_BUFFERS = ("sparselite_mask",)

# Modules whose output channels sparselite knows how to zero (mask) exactly like torch-pruning removes them.
MASKABLE = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)

ParamChange = Callable[[nn.Parameter, nn.Parameter, int, torch.Tensor], None]  # (old, new, dim, kept indices)


@dataclass
class Member:
    """One module touched by a group: its output channels (``out``) or its input channels."""

    name: str
    module: nn.Module
    out: bool
    channels: list[int]  # the member's own channel indices ...
    root_channels: list[int]  # ... and the group-root channel each one belongs to


@dataclass
class ChannelGroup:
    root: str  # name of the module whose output channels define the group
    size: int
    members: list[Member] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # parameterized modules sparselite cannot mask

    def describe(self) -> str:
        outs = ", ".join(m.name for m in self.members if m.out)
        ins = ", ".join(m.name for m in self.members if not m.out)
        return f"{self.root} ({self.size} channels; out: {outs}; in: {ins or '-'})"


class ChannelGraph:
    """The dependency graph of one model instance (built by tracing one forward pass)."""

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor | tuple) -> None:
        self.model = model
        was_training = model.training
        model.eval()  # the tracing forward must not move BatchNorm's running statistics
        try:
            with torch.enable_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch-pruning warns about every unwrapped parameter it sees
                self.graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
        finally:
            model.train(was_training)
        self.names = {module: name for name, module in model.named_modules()}

    def close(self) -> None:
        """Drop the traced autograd graph. Its gradient accumulators remember each parameter's shape, and a
        later backward through a parameter shrunk meanwhile would fail against them."""
        for op, node in self.graph.module2node.items():
            node.grad_fn = None
            if hasattr(op, "_grad_fn"):  # torch-pruning's stand-ins for functional ops (add, cat, ...) keep theirs
                op._grad_fn = None
        self.graph.module2node = {}
        gc.collect()  # groups and the graph reference each other: free the cycle now, not at some later collection

    def __enter__(self) -> "ChannelGraph":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pruner(self, module: nn.Module):
        return self.graph.get_pruner_of_module(module)

    def _group(self, module: nn.Module, idxs: Sequence[int]):
        pruner = self._pruner(module)
        return self.graph.get_pruning_group(module, pruner.prune_out_channels, list(idxs))

    def groups(self, ignored: Sequence[nn.Module] = ()) -> list[ChannelGroup]:
        """Every group rooted at a conv or linear layer, with all its channels."""
        found = []
        for tp_group in self.graph.get_all_groups(ignored_layers=list(ignored)):
            root = tp_group[0].dep.target.module
            group = ChannelGroup(self.names[root], len(tp_group[0].idxs))
            for item in tp_group:
                module = item.dep.target.module
                if not isinstance(module, nn.Module) or not any(True for _ in module.parameters(recurse=False)):
                    continue  # activations, adds, concats, reshapes: nothing to mask or remove
                out = self.graph.is_out_channel_pruning_fn(item.dep.handler)
                if out and not isinstance(module, MASKABLE):
                    group.unknown.append(f"{self.names.get(module, type(module).__name__)} ({type(module).__name__})")
                    continue
                if isinstance(module, nn.Module) and getattr(module, "transposed", False):
                    group.unknown.append(f"{self.names.get(module)} (transposed conv)")
                    continue
                group.members.append(Member(self.names.get(module, "?"), module, out, list(item.idxs), list(item.root_idxs)))
            found.append(group)
        return found

    def importance(self, root: str, size: int, kind: str) -> torch.Tensor:
        """One score per root channel: 'l1' / 'l2' norm over the whole group, or 'bn_scale' (|gamma| of its BNs)."""
        group = self._group(self.model.get_submodule(root), range(size))
        if kind == "bn_scale":
            scorer = tp.importance.BNScaleImportance(normalizer=None)
            scores = scorer(group)
            if scores is not None:
                return scores.detach().float()
            kind = "l1"  # a group without BatchNorm has no scale to rank by
        scorer = tp.importance.GroupMagnitudeImportance(p=1 if kind == "l1" else 2, group_reduction="mean", normalizer=None)
        return scorer(group).detach().float()

    @torch.no_grad()
    def remove(self, root: str, idxs: Sequence[int], on_param_change: ParamChange | None = None) -> None:
        """Physically remove output channels ``idxs`` of ``root`` and everything coupled to them."""
        group = self._group(self.model.get_submodule(root), sorted(int(i) for i in idxs))
        for item in group:
            module = item.dep.target.module
            if not isinstance(module, nn.Module):
                item.dep(item.idxs)
                continue
            before = dict(module.named_parameters(recurse=False))
            shapes = {name: p.shape for name, p in before.items()}
            item.dep(item.idxs)
            for name, old in before.items():
                new = module._parameters.get(name)
                if new is old or new is None:
                    continue
                changed = [d for d in range(old.dim()) if new.shape[d] != shapes[name][d]]
                if not changed:
                    continue
                dim = changed[0]
                removed = set(int(i) for i in item.idxs)
                keep = torch.tensor([i for i in range(shapes[name][dim]) if i not in removed], dtype=torch.long)
                if len(keep) != new.shape[dim]:
                    raise RuntimeError(f"unexpected shape change of {self.names.get(module)}.{name}")
                if on_param_change is not None:
                    on_param_change(old, new, dim, keep)
                for buffer in WEIGHT_SHAPED_BUFFERS:
                    value = module._buffers.get(buffer)
                    if name == "weight" and value is not None and value.shape == shapes[name]:
                        module._buffers[buffer] = value.index_select(dim, keep)


def count_macs_and_params(model: nn.Module, example_inputs: torch.Tensor | tuple) -> tuple[int, int]:
    """(multiply-accumulates, parameters) of one forward pass (torch-pruning's op counter).

    Its counter finds a module's formula by exact type, so it counts no MACs for a subclass: QAT's conv
    and linear (``_QATConv2d``), a library's own ``Linear``. Each subclass is given the formula of its
    nearest torch base (docs/upstream/torch_pruning_subclass_macs.md)."""
    from torch_pruning.utils import op_counter

    was_training = model.training
    try:
        op_counter.CUSTOM_MODULES_MAPPING = _formulas_of_subclasses(model, op_counter.MODULES_MAPPING)
        with torch.no_grad():
            macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    finally:
        op_counter.CUSTOM_MODULES_MAPPING = {}
        model.train(was_training)
    return int(macs), int(params)


def _formulas_of_subclasses(model: nn.Module, formulas: dict) -> dict:
    """type -> torch-pruning's counting hook of its nearest base in ``formulas``, for each module type of
    ``model`` that is not in ``formulas`` itself but subclasses one that is."""
    found = {}
    for module_type in {type(m) for m in model.modules()} - set(formulas):
        base = next((b for b in module_type.__mro__[1:] if b in formulas), None)
        if base is not None:
            found[module_type] = formulas[base]
    return found
