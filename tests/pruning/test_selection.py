"""LayerSelection: a frozen value, validated when it is built (before any model or training)."""

from __future__ import annotations

import pytest
from torch import nn

from sparselite.errors import SparseliteError
from sparselite.pruning.selection import LayerSelection


def test_bad_include_regex_is_an_error_at_construction():
    with pytest.raises(SparseliteError, match="include pattern '\\(' is not a valid regular expression"):
        LayerSelection(include=["("])


def test_layer_selection_is_a_frozen_value():
    selection = LayerSelection(include=["a", "b"], exclude=None)
    assert selection.include == ("a", "b") and selection.exclude == ()
    assert selection == LayerSelection(include=("a", "b"))
    with pytest.raises(AttributeError):
        selection.min_params = 0


def test_unknown_policy_and_negative_min_params_are_errors():
    with pytest.raises(SparseliteError, match="unknown layer policy 'fast'"):
        LayerSelection(policy="fast")
    with pytest.raises(SparseliteError, match="min_params=-1"):
        LayerSelection(min_params=-1)


class Recurrent(nn.Module):
    """A two-layer bidirectional GRU, a GRU cell and a head: every kind of recurrent weight selection meets."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(8, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.cell = nn.GRUCell(8, 16)
        self.head = nn.Linear(32, 4)


def test_recurrent_gate_matrices_are_selected_one_by_one():
    selected = LayerSelection(min_params=0).select(Recurrent())
    gates = [f"rnn.weight_{kind}_l{layer}{direction}" for layer in (0, 1) for direction in ("", "_reverse")
             for kind in ("ih", "hh")]
    assert sorted(selected) == sorted([*gates, "head"])  # no biases, no GRUCell
    target = selected["rnn.weight_hh_l1_reverse"]
    assert target.weight is target.module.weight_hh_l1_reverse
    assert target.mask_buffer == "sparselite_mask_weight_hh_l1_reverse"
    assert selected["head"].mask_buffer == "sparselite_mask"  # plain layers keep the buffer checkpoints hold


def test_a_pattern_addresses_one_gate_matrix_or_the_whole_recurrent_layer():
    model = Recurrent()
    assert list(LayerSelection(include=[r"rnn\.weight_hh_l0"]).select(model)) == ["rnn.weight_hh_l0"]
    assert all(name.startswith("rnn.") for name in LayerSelection(include=["rnn"]).select(model))
    assert list(LayerSelection(exclude=["rnn"], min_params=0).select(model)) == ["head"]


def test_min_params_counts_each_gate_matrix():
    # weight_ih_l0 is 48x8 = 384 weights, weight_hh_l0 48x16 = 768.
    selected = LayerSelection(min_params=500).select(nn.Sequential(nn.GRU(8, 16), nn.Linear(16, 4)))
    assert list(selected) == ["0.weight_hh_l0"]
