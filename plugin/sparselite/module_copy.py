"""A deep copy of a module that leaves behind the Lightning Trainer (or Fabric) it is attached to, and that
copies the tensors a module caches from its parameters."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def detached_copy(module: nn.Module) -> nn.Module:
    """``copy.deepcopy`` of ``module`` with its ``_trainer`` / ``_fabric`` references set to None in the
    copy: deep-copying a LightningModule would otherwise copy the whole Trainer, its data and loggers.

    A tensor a module computed from its parameters and kept (timm's LeViT caches its attention biases so, in
    eval mode) is no graph leaf, and ``deepcopy`` refuses it; the copy gets it detached."""
    memo = {}
    for attr in ("_trainer", "_fabric"):
        if getattr(module, attr, None) is not None:
            memo[id(getattr(module, attr))] = None
    for tensor in _cached_tensors(module):
        if not tensor.is_leaf:
            memo[id(tensor)] = tensor.detach().clone()
    return copy.deepcopy(module, memo)


def _cached_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """The tensors in each submodule's own attributes (and in the dicts, lists and tuples there), buffers too."""
    for sub in module.modules():
        yield from (buffer for buffer in sub._buffers.values() if buffer is not None)
        for name, value in vars(sub).items():
            if name not in ("_parameters", "_buffers", "_modules"):
                yield from _tensors_in(value)


def _tensors_in(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 2 and isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item, depth + 1)
    elif depth < 2 and isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item, depth + 1)
