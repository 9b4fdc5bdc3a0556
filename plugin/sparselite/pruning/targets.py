"""What a mask prunes: a layer's ``weight``, or one gate matrix of a recurrent layer.

A Conv/Linear layer is one target, named after its module (``features.3``); its mask is the buffer
``<module>.sparselite_mask``.

A recurrent layer (``nn.GRU``, ``nn.LSTM``, ``nn.RNN``) keeps an input matrix and a recurrent matrix
per layer and direction (``weight_ih_l0``, ``weight_hh_l0``, ``weight_hh_l1_reverse``...), and has no
``weight`` of its own. Each matrix is a target, named ``<module>.<parameter>`` (``rnn.weight_hh_l0``)
so that include/exclude patterns and overrides can address it alone; a pattern that names the module
(``rnn``) addresses all of them. Its mask is the buffer ``<module>.sparselite_mask_<parameter>`` on the
recurrent module: the matrices are parameters, not modules, so that is where a state_dict can hold it.
The converter writes each matrix as the weight of a FULLY_CONNECTED (the recurrent one read at every
time step), so the zeros reach the file. Biases and an LSTM's projections (``weight_hr_l*``) stay dense.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

MASK_BUFFER = "sparselite_mask"
RECURRENT_WEIGHT = re.compile(r"weight_(ih|hh)_l\d+(_reverse)?")


def mask_buffer_name(parameter: str) -> str:
    """``sparselite_mask`` for a layer's ``weight`` (what checkpoints of Conv/Linear layers hold), else one per parameter."""
    return MASK_BUFFER if parameter == "weight" else f"{MASK_BUFFER}_{parameter}"


@dataclass(frozen=True)
class PruningTarget:
    """One prunable weight: ``module``'s parameter ``parameter``, where ``module`` is named ``module_name``."""

    module_name: str
    module: nn.Module
    parameter: str = "weight"

    @property
    def name(self) -> str:
        if self.parameter == "weight":
            return self.module_name
        return f"{self.module_name}.{self.parameter}" if self.module_name else self.parameter

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.parameter)

    @property
    def mask_buffer(self) -> str:
        return mask_buffer_name(self.parameter)

    def matched_by(self, pattern: re.Pattern) -> bool:
        """Whether a name pattern addresses this weight: by its own name, or by its module's."""
        return bool(pattern.fullmatch(self.name) or pattern.fullmatch(self.module_name))


def recurrent_weights(module: nn.Module) -> list[str]:
    """The gate matrices of a recurrent layer, in its own order."""
    return [name for name, parameter in module.named_parameters(recurse=False)
            if RECURRENT_WEIGHT.fullmatch(name) and parameter.dim() == 2]


def layer_targets(module_name: str, module: nn.Module) -> list[PruningTarget]:
    if isinstance(module, nn.RNNBase):
        return [PruningTarget(module_name, module, parameter) for parameter in recurrent_weights(module)]
    return [PruningTarget(module_name, module)]


def masked_targets(model: nn.Module) -> dict[str, PruningTarget]:
    """Every weight of ``model`` that carries a pruning mask, by target name."""
    found = {}
    for module_name, module in model.named_modules():
        for buffer in module._buffers:
            if buffer == MASK_BUFFER:
                target = PruningTarget(module_name, module)
            elif buffer.startswith(MASK_BUFFER + "_") and buffer[len(MASK_BUFFER) + 1:] in module._parameters:
                target = PruningTarget(module_name, module, buffer[len(MASK_BUFFER) + 1:])
            else:
                continue
            found[target.name] = target
    return found


def pruned_weight(model: nn.Module, target_name: str) -> torch.Tensor:
    """The weight a target name stands for: ``<module>.weight``, or a recurrent layer's gate matrix."""
    module_name, _, parameter = target_name.rpartition(".")
    owner = model.get_submodule(module_name)
    if isinstance(owner, nn.RNNBase) and RECURRENT_WEIGHT.fullmatch(parameter):
        return getattr(owner, parameter)
    return model.get_submodule(target_name).weight


@torch.no_grad()
def strip_masks(model: nn.Module) -> nn.Module:
    """Apply every pruning mask to its weight and drop the buffer (the float model export starts from)."""
    for target in masked_targets(model).values():
        target.weight.data.mul_(target.module._buffers.pop(target.mask_buffer))
    return model
