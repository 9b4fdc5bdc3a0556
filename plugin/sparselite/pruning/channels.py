"""Gradual channel pruning without Lightning: prepare, step, apply, shrink, restore.

Whole output channels are masked on the polynomial schedule (the channel's conv rows, its bias and its
BatchNorm's gamma/beta are zeroed, so the channel outputs exactly 0 and training recovers around it).
At the end, ``shrink`` removes the masked channels physically: a smaller dense model whose outputs
equal the masked model's. Groups of coupled channels come from ``sparselite.pruning.dependency``.

State:
  - ``<root>.sparselite_channel_mask`` (bool, one per root channel) buffers while masking;
  - after ``shrink``, the *plan* (which channels each group lost) rides in the model's state_dict
    under ``sparselite_channel_plan``; loading such a state_dict into a model whose pruner is prepared
    first rebuilds the smaller structure, so checkpoints of a shrunk model load and resume.

One file for the whole lifecycle (over 350 lines): masking, shrinking and restoring share the group and
plan structures, and splitting them would spread one state machine over several modules.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparselite.deploy_form import to_deploy_form
from sparselite.errors import SparseliteError
from sparselite.hook_ids import hook_ids_apart
from sparselite.module_copy import detached_copy
from sparselite.pruning.dependency import ChannelGraph, ChannelGroup, count_macs_and_params
from sparselite.pruning.schedule import PolynomialDecay

CHANNEL_MASK = "sparselite_channel_mask"
PLAN_KEY = "sparselite_channel_plan"
IMPORTANCES = ("l1", "l2", "bn_scale")

# Masked and shrunk outputs are the same computation with zeros left out; float reassociation only.
EQUIVALENCE_TOLERANCE = 1e-4


def kept_channels(size: int, sparsity: float, round_to: int, min_channels: int) -> int:
    """Channels a group keeps at ``sparsity``: a multiple of ``round_to`` (XNNPACK's int8 tiles), at least
    ``min_channels``, never more than it has."""
    floor = math.ceil(min_channels / round_to) * round_to
    if size <= floor:
        return size
    keep = int(round((1.0 - sparsity) * size / round_to)) * round_to
    return min(size, max(keep, floor))


class _PlanHooks:
    """The state_dict hooks' link to their pruner. Deep copies of the model (export makes them) share it
    rather than copying the pruner (and the full-width model it keeps); the hooks act only on the model
    the pruner was prepared on."""

    def __init__(self, pruner: "ChannelPruner") -> None:
        self.pruner = pruner

    def __deepcopy__(self, memo: dict) -> "_PlanHooks":
        return self


def _save_plan(hooks: _PlanHooks, module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    if hooks.pruner.plan and module is hooks.pruner.model:
        state_dict[prefix + PLAN_KEY] = [[root, list(idxs)] for root, idxs in hooks.pruner.plan]


def _load_plan(hooks: _PlanHooks, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    plan = state_dict.pop(prefix + PLAN_KEY, None)
    if plan is not None and module is hooks.pruner.model:
        hooks.pruner.restore(plan)


@dataclass
class PrunedGroup:
    group: ChannelGroup
    schedule: PolynomialDecay

    @property
    def name(self) -> str:
        """The group's producing conv/linear (what a user calls the layer), not its depthwise follower."""
        for member in self.group.members:
            if member.out and not isinstance(member.module, nn.modules.batchnorm._BatchNorm) and not _is_depthwise(member.module):
                return member.name
        return self.group.root


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.out_channels


class ChannelPruner:
    def __init__(
        self,
        schedule: PolynomialDecay,
        importance: str = "l2",
        round_to: int = 8,
        min_channels: int = 8,
        exclude: Sequence[str] | None = None,
    ) -> None:
        if importance not in IMPORTANCES:
            raise SparseliteError(f"importance='{importance}' is not one of {', '.join(IMPORTANCES)}")
        if round_to < 1:
            raise SparseliteError(f"round_to={round_to} must be >= 1 (8 matches XNNPACK's int8 tiles)")
        if min_channels < 1:
            raise SparseliteError(f"min_channels={min_channels} must be >= 1")
        self.exclude = []
        for text in exclude or ():
            try:
                self.exclude.append(re.compile(text))
            except re.error as err:
                raise SparseliteError(f"exclude pattern '{text}' is not a valid regular expression: {err}") from None
        self.schedule, self.importance = schedule, importance
        self.round_to, self.min_channels = round_to, min_channels
        self.model: nn.Module | None = None
        self.example_inputs: tuple | None = None
        self.groups: dict[str, PrunedGroup] = {}
        self.skipped: dict[str, str] = {}  # group -> why it is left alone
        self.plan: list[tuple[str, list[int]]] = []  # what shrink removed: (group root, root channel indices)
        self.last_update_step: int | None = None
        self.before: dict[str, int] = {}  # macs / params of the model as prepared (full width)
        self._unpruned: nn.Module | None = None

    # ------------------------------------------------------------------ set-up
    def prepare(self, model: nn.Module, example_inputs: torch.Tensor | tuple) -> dict[str, PrunedGroup]:
        """Trace the model, find its channel groups, check each is safe to remove, give each a mask."""
        self.model = model
        to_deploy_form(model)  # the channels of the convs the file holds
        self.example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        hooks = _PlanHooks(self)
        with hook_ids_apart(model):  # a pickled copy keeps its hooks when new ones come (hook_ids.py)
            model.register_state_dict_post_hook(functools.partial(_save_plan, hooks))
            model.register_load_state_dict_pre_hook(functools.partial(_load_plan, hooks))
        self.before = dict(zip(("macs", "params"), count_macs_and_params(model, self.example_inputs)))
        self._unpruned = detached_copy(model)  # full width, for "before" numbers (latency) in export reports
        self._find_groups()
        for pruned in self.groups.values():
            root = model.get_submodule(pruned.group.root)
            if CHANNEL_MASK not in root._buffers:
                root.register_buffer(CHANNEL_MASK, torch.ones(pruned.group.size, dtype=torch.bool))
        return self.groups

    def _graph(self) -> ChannelGraph:
        # Traced afresh whenever needed and dropped after: a live graph keeps the traced autograd graph,
        # whose gradient accumulators would still expect the parameters' pre-shrink shapes.
        return ChannelGraph(self.model, self.example_inputs)

    def _find_groups(self) -> None:
        model = self.model
        outputs = _output_layers(model, self.example_inputs)
        with self._graph() as graph:
            all_groups = graph.groups(ignored=outputs)
        candidates: list[PrunedGroup] = []
        self.skipped = {}
        for group in all_groups:
            pruned = PrunedGroup(group, self.schedule)
            name = pruned.name
            if group.unknown:
                self.skipped[name] = f"it includes layers sparselite cannot mask: {', '.join(group.unknown)}"
            elif any(p.fullmatch(m.name) for p in self.exclude for m in group.members if m.out):
                self.skipped[name] = "excluded"
            elif kept_channels(group.size, 1.0 - 1e-9, self.round_to, self.min_channels) >= group.size:
                self.skipped[name] = f"{group.size} channels, at or below min_channels={self.min_channels}"
            else:
                candidates.append(pruned)
        for pattern in self.exclude:
            if not any(pattern.fullmatch(m.name) for g in all_groups for m in g.members):
                raise SparseliteError(f"exclude pattern '{pattern.pattern}' matches no layer in a channel group")
        unsafe = _unsafe_groups(model, self.example_inputs, candidates)
        self.groups = {}
        for pruned in candidates:
            if pruned.group.root in unsafe:
                self.skipped[pruned.name] = unsafe[pruned.group.root]
            else:
                self.groups[pruned.group.root] = pruned
        for name, why in self.skipped.items():
            if why != "excluded" and "min_channels" not in why:
                warnings.warn(f"[sparselite] channel pruning leaves group '{name}' alone: {why}", stacklevel=2)
        if not self.groups:
            raise SparseliteError(
                "channel pruning found no group it can prune safely"
                + (f"; left alone: {'; '.join(f'{k}: {v}' for k, v in self.skipped.items())}" if self.skipped else "")
            )

    # ------------------------------------------------------------------ masking
    def _require(self) -> None:
        if self.model is None:
            raise RuntimeError("ChannelPruner.prepare(model, example_inputs) must run first")

    def mask(self, root: str) -> torch.Tensor:
        return self.model.get_submodule(root)._buffers[CHANNEL_MASK]

    @property
    def shrunk(self) -> bool:
        return bool(self.plan)

    @torch.no_grad()
    def step(self, step: int) -> bool:
        """Update the channel masks if ``step`` is on the schedule; returns whether they changed."""
        self._require()
        if self.shrunk:
            return False
        update, sparsity = self.schedule(step)
        if not update:
            return False
        with self._graph() as graph:
            importance = {root: graph.importance(root, pruned.group.size, self.importance) for root, pruned in self.groups.items()}
        for root, pruned in self.groups.items():
            mask = self.mask(root)
            keep = kept_channels(pruned.group.size, sparsity, self.round_to, self.min_channels)
            # A channel masked once stays masked; stable order so equal scores resolve the same way on resume.
            scores = importance[root].masked_fill(~mask, float("-inf"))
            order = torch.argsort(scores, descending=True, stable=True)
            new = torch.zeros_like(mask)
            new[order[:keep]] = True
            mask.copy_(mask & new)
        self.last_update_step = step
        self.apply_masks()
        return True

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the masked channels' rows, biases and BN affine; call after every optimizer step."""
        if self.shrunk:
            return
        for root, pruned in self.groups.items():
            _zero_channels(pruned.group, ~self.mask(root))

    def channel_ratio(self) -> dict[str, float]:
        """Fraction of channels masked (or removed) per group, plus 'overall'."""
        report, removed, total = {}, 0, 0
        for root, pruned in self.groups.items():
            size = pruned.group.size
            gone = len(dict(self.plan).get(root, [])) if self.shrunk else int((~self.mask(root)).sum())
            report[pruned.name] = gone / size
            removed, total = removed + gone, total + size
        report["overall"] = removed / max(total, 1)
        return report

    # ------------------------------------------------------------------ physical removal
    @torch.no_grad()
    def shrink(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> list[tuple[str, list[int]]]:
        """Remove the masked channels. Shrunk layers get new parameter objects; ``optimizers`` are updated to
        hold them, with their state (momentum, Adam moments) sliced to match, so training continues on the
        smaller model as it would have on the masked one."""
        self._require()
        if self.shrunk:
            return self.plan
        model = self.model
        self.apply_masks()
        probe = _probe_inputs(self.example_inputs)
        expected = _eval_forward(model, probe)
        plan = [(root, [int(i) for i in torch.nonzero(~self.mask(root)).flatten()]) for root in self.groups]
        plan = [(root, idxs) for root, idxs in plan if idxs]
        optimizers = list(optimizers)
        self._remove(plan, functools.partial(_slice_optimizer_state, optimizers))
        got = _eval_forward(model, probe)
        error = _max_relative_error(expected, got)
        if error > EQUIVALENCE_TOLERANCE:
            raise SparseliteError(f"the shrunk model's outputs differ from the masked model's by {error:.2e} (relative); "
                                  "this is a sparselite bug: please report it with the model")
        return self.plan

    def _remove(self, plan: list[tuple[str, list[int]]], on_param_change=None) -> None:
        with self._graph() as graph:
            for root, idxs in plan:
                graph.remove(root, idxs, on_param_change)
        for root in self.groups:
            self.model.get_submodule(root)._buffers.pop(CHANNEL_MASK, None)
        self.plan = [(root, list(idxs)) for root, idxs in plan]

    def restore(self, plan: Sequence[Sequence[Any]]) -> None:
        """Rebuild the shrunk structure from a saved plan (before its state_dict loads)."""
        self._require()
        plan = [(str(root), [int(i) for i in idxs]) for root, idxs in plan]
        if self.shrunk:
            if plan != self.plan:
                raise SparseliteError("this state_dict was shrunk with another channel plan than the model it is loaded into")
            return
        unknown = [root for root, _ in plan if root not in self.groups]
        if unknown:
            raise SparseliteError(f"the checkpoint's channel plan names groups this model does not prune: {unknown}; "
                                  "use the same model and ChannelPruning settings as the run that saved it")
        self._remove(plan)

    def unpruned_copy(self) -> nn.Module:
        """A copy of the model as prepared: full width, weights as they were then (for size and latency
        comparisons, not for accuracy)."""
        self._require()
        return detached_copy(self._unpruned)

    def size(self) -> dict[str, int]:
        """MACs and parameters now (after shrink: of the smaller model)."""
        self._require()
        return dict(zip(("macs", "params"), count_macs_and_params(self.model, self.example_inputs)))

    def state_dict(self) -> dict:
        return {"last_update_step": self.last_update_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_update_step = state.get("last_update_step")


# ---------------------------------------------------------------------- helpers
def _zero_channels(group: ChannelGroup, removed: torch.Tensor) -> None:
    if not bool(removed.any()):
        return
    for member in group.members:
        if not member.out:
            continue
        channels = [c for c, r in zip(member.channels, member.root_channels) if removed[r]]
        if not channels:
            continue
        index = torch.tensor(channels, dtype=torch.long)
        for name in ("weight", "bias"):
            param = getattr(member.module, name, None)
            if isinstance(param, torch.Tensor):
                param.data.index_fill_(0, index, 0.0)


def _slice_optimizer_state(optimizers: list[torch.optim.Optimizer], old: nn.Parameter, new: nn.Parameter,
                           dim: int, keep: torch.Tensor) -> None:
    """Put ``new`` where ``old`` was in each optimizer, with its state (momentum, Adam moments) sliced to fit."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = optimizer.state.pop(old, None)
        if state:
            optimizer.state[new] = {
                key: value.index_select(dim, keep.to(value.device)) if isinstance(value, torch.Tensor) and value.shape == old.shape else value
                for key, value in state.items()
            }


def _output_layers(model: nn.Module, example_inputs: tuple) -> list[nn.Module]:
    """Layers whose output is the model's output (the classifier): their output channels stay."""
    produced: dict[int, nn.Module] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out: produced.__setitem__(id(out), mod))
             for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    try:
        outputs = _eval_forward(model, example_inputs, keep_refs=True)
    finally:
        for hook in hooks:
            hook.remove()
    flat = outputs if isinstance(outputs, (tuple, list)) else [outputs]
    return [produced[id(t)] for t in flat if id(t) in produced]


def _probe_inputs(example_inputs: tuple) -> tuple:
    # Random, not the (often all-zero) example: zeros would hide a channel that leaks a constant.
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn((2, *x.shape[1:]), generator=generator, dtype=x.dtype) if x.is_floating_point() else x
                 for x in example_inputs)


@torch.no_grad()
def _eval_forward(model: nn.Module, inputs: tuple, keep_refs: bool = False):
    was_training = model.training
    model.eval()
    try:
        out = model(*inputs)
    finally:
        model.train(was_training)
    if keep_refs:
        return out
    return [t.detach().clone() for t in (out if isinstance(out, (tuple, list)) else [out])]


def _max_relative_error(expected: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    if len(expected) != len(got) or any(a.shape != b.shape for a, b in zip(expected, got)):
        return float("inf")
    return max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) for a, b in zip(expected, got))


def _unsafe_groups(model: nn.Module, example_inputs: tuple, candidates: list[PrunedGroup]) -> dict[str, str]:
    """Groups whose masked model is not what their removal gives. Checked by doing both, one channel per
    group, on a copy: a channel that leaks a constant (e.g. through a sigmoid: sigmoid(0) = 0.5), a
    coupling torch-pruning misses, or an op it handles wrongly all show up as different outputs."""
    unsafe: dict[str, str] = {}
    probe = _probe_inputs(example_inputs)
    backup = {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[-1] != PLAN_KEY}
    try:
        pending = list(candidates)
        while pending:  # one round per unsafe group found: the copy holds a wrong removal after it
            model.load_state_dict(backup, strict=False)
            copy_model = detached_copy(model)
            copy_graph = ChannelGraph(copy_model, example_inputs)  # a copy: its traced graph can stay
            roots = {g.root for g in copy_graph.groups()}
            verified = 0
            for pruned in pending:
                root, size = pruned.group.root, pruned.group.size
                channel = size // 2
                removed = torch.zeros(size, dtype=torch.bool)
                removed[channel] = True
                _zero_channels(pruned.group, removed)
                expected = _eval_forward(model, probe)
                try:
                    if root not in roots:
                        raise RuntimeError("the group is not found again on a copy of the model")
                    copy_graph.remove(root, [channel])
                    error = _max_relative_error(expected, _eval_forward(copy_model, probe))
                    reason = (f"removing a channel changes the model's outputs by {error:.1e} (relative), so masking "
                              "is not removal here (an op after it maps 0 to a non-zero value, or an unsupported coupling)")
                except Exception as err:  # noqa: BLE001 - any failure means: leave the group alone
                    error, reason = float("inf"), f"torch-pruning cannot remove its channels ({type(err).__name__}: {err})"
                if error > EQUIVALENCE_TOLERANCE:
                    unsafe[root] = reason
                    break
                verified += 1
            pending = pending[verified + 1:]
    finally:
        model.load_state_dict(backup, strict=False)
    return unsafe
