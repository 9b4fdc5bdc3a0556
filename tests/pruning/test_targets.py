"""Pruning targets: the masks on a GRU's gate matrices are found by name and stripped onto their weights."""

from __future__ import annotations

import torch
from torch import nn

from sparselite.pruning.pruner import MagnitudePruner
from sparselite.pruning.schedule import PolynomialDecay
from sparselite.pruning.selection import LayerSelection
from sparselite.pruning.targets import masked_targets, pruned_weight, strip_masks


def test_masks_of_recurrent_and_plain_layers_are_found_and_stripped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(8, 16, bidirectional=True), nn.Linear(32, 64))
    schedule = PolynomialDecay(final_sparsity=0.5, begin_step=0, end_step=1, frequency=1)
    pruner = MagnitudePruner(schedule, selection=LayerSelection(min_params=0))
    pruner.prepare(model)
    names = ["0.weight_ih_l0", "0.weight_hh_l0", "0.weight_ih_l0_reverse", "0.weight_hh_l0_reverse", "1"]
    assert list(masked_targets(model)) == names
    assert pruned_weight(model, "0.weight_hh_l0_reverse") is model[0].weight_hh_l0_reverse
    assert pruned_weight(model, "1") is model[1].weight
    pruner.step(1)
    # The masks are what strip_masks applies: revive the pruned weights, then strip.
    with torch.no_grad():
        for name in names:
            pruned_weight(model, name).add_(1.0)
    strip_masks(model)
    assert masked_targets(model) == {} and not [b for b, _ in model.named_buffers() if "sparselite" in b]
    for name in names:
        assert float((pruned_weight(model, name) == 0).float().mean()) == 0.5, name
