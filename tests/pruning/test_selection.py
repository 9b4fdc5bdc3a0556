"""LayerSelection: a frozen value, validated when it is built (before any model or training)."""

from __future__ import annotations

import pytest

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
