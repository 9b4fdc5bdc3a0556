"""``detached_copy``: a module's copy without its Trainer, with the tensors it caches from its parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparselite.module_copy import detached_copy


class CachesItsBias(nn.Module):
    """Like timm's LeViT attention: in eval mode it keeps a tensor computed from a parameter, per device."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(4))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.cache[str(x.device)] = self.bias * 2
        return x + self.bias * 2


def test_a_module_that_cached_a_tensor_computed_with_gradients_is_copied():
    model = CachesItsBias().eval()
    model(torch.zeros(4))  # outside no_grad: the cached tensor is no graph leaf
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(model)
    copied = detached_copy(model)
    cached, original = copied.cache["cpu"], model.cache["cpu"]
    assert torch.equal(cached, original) and cached.is_leaf and not cached.requires_grad
    assert copied.bias is not model.bias and torch.equal(copied(torch.ones(4)), model(torch.ones(4)))
