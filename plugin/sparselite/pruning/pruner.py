"""Gradual magnitude pruning without Lightning: prepare, step, apply, report.

Masks are buffers (``<layer>.sparselite_mask``; a recurrent layer's ``<rnn>.sparselite_mask_weight_hh_l0``,
see ``targets.py``), so they travel in every state_dict and checkpoint.
The schedule is a pure function of the optimizer step, so a resumed run recomputes the same targets;
masks are recomputed from weight magnitudes only on schedule beats, and pruned weights are exactly
zero, so a resumed run ends with the same masks as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Literal, get_args

import torch
from torch import nn

from sparselite.deploy_form import to_deploy_form
from sparselite.errors import SparseliteError
from sparselite.pruning.masks import Pattern, global_masks, layer_mask
from sparselite.pruning.schedule import PolynomialDecay
from sparselite.pruning.selection import LayerSelection
from sparselite.pruning.targets import MASK_BUFFER, mask_buffer_name  # noqa: F401  (MASK_BUFFER: imported from here)

Scope = Literal["layer", "global"]  # 'layer': each layer reaches the target; 'global': one threshold for all


@dataclasses.dataclass
class PrunedLayer:
    name: str
    module: nn.Module
    pattern: Pattern
    schedule: PolynomialDecay
    in_global_pool: bool
    parameter: str = "weight"  # a recurrent layer's gate matrix: 'weight_hh_l0'

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.parameter)

    @property
    def mask(self) -> torch.Tensor:
        return getattr(self.module, mask_buffer_name(self.parameter))


class MagnitudePruner:
    def __init__(
        self,
        schedule: PolynomialDecay,
        pattern: str = "unstructured",
        scope: Scope = "layer",
        selection: LayerSelection | None = None,
        overrides: Mapping[str, Mapping[str, object]] | None = None,
    ) -> None:
        if scope not in get_args(Scope):
            raise SparseliteError(f"scope='{scope}' is not one of 'layer' (per-layer threshold) or 'global'")
        self.schedule = schedule
        self.pattern = Pattern.parse(pattern)
        self.scope = scope
        self.selection = selection if selection is not None else LayerSelection()
        if overrides is not None and not isinstance(overrides, Mapping):
            raise SparseliteError(f"overrides={overrides!r} must map a layer-name regex to {{final_sparsity, pattern}}")
        self.overrides = {key: self._check_override(key, value) for key, value in (overrides or {}).items()}
        self.layers: dict[str, PrunedLayer] = {}
        self.last_update_step: int | None = None

    @staticmethod
    def _check_override(key: str, value: object) -> dict:
        if not isinstance(value, Mapping):
            raise SparseliteError(f"override '{key}' is {value!r}; give a mapping such as {{final_sparsity: 0.5}}")
        value = dict(value)
        unknown = set(value) - {"final_sparsity", "pattern"}
        if unknown:
            raise SparseliteError(f"override '{key}' has unknown keys {sorted(unknown)}; use final_sparsity and/or pattern")
        try:
            re.compile(key)
        except re.error as err:
            raise SparseliteError(f"override pattern '{key}' is not a valid regular expression: {err}") from None
        if "pattern" in value:
            if not isinstance(value["pattern"], str):
                raise SparseliteError(f"override '{key}' has pattern={value['pattern']!r}; give a name such as '1x16'")
            Pattern.parse(value["pattern"])
        if "final_sparsity" in value:
            final = value["final_sparsity"]
            if isinstance(final, bool) or not isinstance(final, (int, float)) or not 0.0 <= final < 1.0:
                raise SparseliteError(f"override '{key}' has final_sparsity={final!r}; give a fraction in [0, 1)")
        return value

    def prepare(self, model: nn.Module) -> dict[str, PrunedLayer]:
        """Pick the layers (of the deploy form, ``deploy_form.py``), check each pattern fits, and give each a
        mask buffer (all ones)."""
        to_deploy_form(model)
        selected = self.selection.select(model)
        for key in self.overrides:
            if not any(target.matched_by(re.compile(key)) for target in selected.values()):
                raise SparseliteError(f"override '{key}' matches no pruned layer; pruned layers: {', '.join(selected)}")
        self.layers = {}
        for name, target in selected.items():
            override = next((v for k, v in self.overrides.items() if target.matched_by(re.compile(k))), {})
            pattern = Pattern.parse(override.get("pattern", str(self.pattern)))
            schedule = self.schedule
            if "final_sparsity" in override:
                final = float(override["final_sparsity"])
                schedule = dataclasses.replace(
                    schedule, final_sparsity=final, initial_sparsity=min(schedule.initial_sparsity, final)
                )
            pattern.check_fits(target.weight.shape, name)
            if pattern.kind == "n:m" and abs(schedule.final_sparsity - pattern.max_sparsity) > 1e-9:
                raise SparseliteError(
                    f"pattern {pattern} means final_sparsity {pattern.max_sparsity:g} for layer '{name}', "
                    f"not {schedule.final_sparsity:g}; set final_sparsity to {pattern.max_sparsity:g}"
                )
            if not hasattr(target.module, target.mask_buffer):
                target.module.register_buffer(target.mask_buffer, torch.ones_like(target.weight, dtype=torch.bool))
            self.layers[name] = PrunedLayer(name, target.module, pattern, schedule, in_global_pool=not override,
                                            parameter=target.parameter)
        return self.layers

    def _require_prepared(self) -> None:
        if not self.layers:
            raise RuntimeError("MagnitudePruner.prepare(model) must run before step()")

    @torch.no_grad()
    def step(self, step: int) -> bool:
        """Update the masks if ``step`` is on the schedule; returns whether they changed."""
        self._require_prepared()
        updates = {name: layer.schedule(step) for name, layer in self.layers.items()}
        if not any(update for update, _ in updates.values()):
            return False
        pooled = [n for n, l in self.layers.items() if l.in_global_pool and updates[n][0]]
        if self.scope == "global" and pooled:
            new = global_masks({n: self.layers[n].weight for n in pooled}, updates[pooled[0]][1], self.pattern)
        else:
            new = {}
        for name, layer in self.layers.items():
            update, sparsity = updates[name]
            if not update:
                continue
            mask = new.get(name)
            if mask is None:
                mask = layer_mask(layer.weight, sparsity, layer.pattern)
            # A weight pruned once stays pruned: the schedule only ever grows sparsity.
            layer.mask.copy_(layer.mask & mask.bool())
        self.last_update_step = step
        self.apply_masks()
        return True

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned weights; call after every optimizer step (momentum and decay revive them)."""
        # In place: a recurrent layer's flat weight list (and cuDNN's packed copy) holds these same tensors.
        for layer in self.layers.values():
            layer.weight.mul_(layer.mask)

    def sparsity(self) -> dict[str, float]:
        """Measured sparsity (fraction of exact zeros) of every pruned weight, plus 'overall'."""
        report, zeros, total = {}, 0, 0
        for name, layer in self.layers.items():
            weight = layer.weight.detach()
            n_zero = int((weight == 0).sum())
            report[name] = n_zero / weight.numel()
            zeros, total = zeros + n_zero, total + weight.numel()
        report["overall"] = zeros / max(total, 1)
        return report

    def state_dict(self) -> dict:
        return {"last_update_step": self.last_update_step}

    def load_state_dict(self, state: Mapping) -> None:
        self.last_update_step = state.get("last_update_step")
