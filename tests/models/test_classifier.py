"""``ImageClassifier`` refuses optimizer settings that would train to nothing, at construction."""

from __future__ import annotations

import pytest

from conftest import tiny_mobilenet
from sparselite.errors import SparseliteError
from sparselite.models.classifier import ImageClassifier
from sparselite.models.mobilenet import MobileNetLite


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=float("nan")), "lr=nan"),
    (dict(lr=float("inf")), "lr=inf"),
    (dict(lr=-0.1), "lr=-0.1"),
    (dict(lr=None), "lr=None"),
    (dict(weight_decay=-1e-4), "weight_decay=-0.0001"),
    (dict(weight_decay=float("nan")), "weight_decay=nan"),
    (dict(input_shape=(1, 28)), "input_shape"),
    (dict(input_shape=(1, -28, 28)), "input_shape"),
])
def test_bad_optimizer_and_shape_settings_are_refused(kwargs, message):
    with pytest.raises(SparseliteError, match=message):
        ImageClassifier(tiny_mobilenet(), **kwargs)


@pytest.mark.parametrize("kwargs", [dict(num_classes=0), dict(in_channels=-1), dict(stem_channels=0),
                                    dict(blocks=((-16, 1),)), dict(blocks=((16, 0),))])
def test_mobilenet_refuses_non_positive_sizes(kwargs):
    with pytest.raises(SparseliteError, match="must be"):
        MobileNetLite(**kwargs)
