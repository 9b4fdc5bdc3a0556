"""A deep copy of a module that leaves behind the Lightning Trainer (or Fabric) it is attached to."""

from __future__ import annotations

import copy

from torch import nn


def detached_copy(module: nn.Module) -> nn.Module:
    """``copy.deepcopy`` of ``module`` with its ``_trainer`` / ``_fabric`` references set to None in the
    copy: deep-copying a LightningModule would otherwise copy the whole Trainer, its data and loggers."""
    memo = {}
    for attr in ("_trainer", "_fabric"):
        if getattr(module, attr, None) is not None:
            memo[id(getattr(module, attr))] = None
    return copy.deepcopy(module, memo)
