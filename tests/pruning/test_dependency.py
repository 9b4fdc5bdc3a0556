"""Counting MACs and parameters (``pruning/dependency.count_macs_and_params``): the same for a model and its
QAT-prepared self, whose convs and linears are subclasses torch-pruning's counter does not know."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from conftest import tiny_mobilenet
from sparselite.pruning.dependency import count_macs_and_params
from sparselite.quantization.qat import QuantizationSimulator

EXAMPLE = torch.zeros(1, 1, 28, 28)


def test_a_qat_prepared_model_counts_the_macs_of_its_float_self():
    model = tiny_mobilenet()
    float_count = count_macs_and_params(model, EXAMPLE)
    QuantizationSimulator(begin_step=0).prepare(model, (EXAMPLE,))
    assert {type(m).__name__ for m in model.modules()} & {"_QATConv2d", "_QATLinear"}
    assert count_macs_and_params(model, EXAMPLE) == float_count


class LibraryConv(nn.Conv2d):
    """A library's own conv: computes what nn.Conv2d does."""


def test_upstream_counter_counts_no_macs_for_a_subclass():
    """docs/upstream/torch_pruning_subclass_macs.md: when this fails, torch-pruning counts subclasses by their
    base, and ``count_macs_and_params`` no longer needs to map them."""
    model, x = nn.Sequential(LibraryConv(3, 8, 3)), torch.randn(1, 3, 8, 8)
    assert tp.utils.count_ops_and_params(model, x) == (0, 224)
    assert count_macs_and_params(model, x) == (8 * 3 * 9 * 6 * 6 + 8 * 6 * 6, 224)
