"""The demo MobileNetLite: shape, size, and the layers the sparse benchmark relies on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparselite.models.mobilenet import MobileNetLite
from sparselite.pruning.pruner import MagnitudePruner
from sparselite.pruning.schedule import PolynomialDecay


def test_classifies_28x28_images():
    model = MobileNetLite().eval()
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_pruned_1x1_convs_dominate_the_weights():
    """The size targets of benchmarks/sparse_patterns.py assume what the docstring promises: ~1.08M
    weights, layers that read 512 inputs, and the default-pruned layers holding almost all of them."""
    model = MobileNetLite()
    total = sum(p.numel() for p in model.parameters() if p.dim() > 1)
    layers = MagnitudePruner(PolynomialDecay()).prepare(model)
    pruned = sum(layer.module.weight.numel() for layer in layers.values())
    assert 1.0e6 < total < 1.2e6
    assert pruned / total > 0.97
    assert max(layer.module.weight.shape[1] for layer in layers.values()) >= 512
    assert all(isinstance(layer.module, (nn.Conv2d, nn.Linear)) for layer in layers.values())


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.8), ("1x4", 0.8), ("1x16", 0.8), ("2:4", 0.5)])
def test_every_benchmark_pattern_tiles_every_default_pruned_layer(pattern, sparsity):
    layers = MagnitudePruner(PolynomialDecay(final_sparsity=sparsity), pattern=pattern).prepare(MobileNetLite())
    assert len(layers) == 9  # eight pointwise convs and the classifier
