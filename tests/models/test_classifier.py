"""``ImageClassifier`` refuses optimizer settings that would train to nothing, at construction, and
trains models with auxiliary classifiers."""

from __future__ import annotations

import pytest
import torch

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


def test_auxiliary_logits_add_to_the_loss_and_the_main_logits_score():
    """GoogLeNet and Inception v3 return (logits, aux2, aux1) in training mode."""
    import torch.nn.functional as F

    class WithAuxiliary(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.main, self.aux = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)

        def forward(self, x):
            x = x.flatten(1)
            return (self.main(x), self.aux(x)) if self.training else self.main(x)

    torch.manual_seed(0)
    classifier = ImageClassifier(WithAuxiliary(), input_shape=(1, 2, 2))
    images, labels = torch.randn(8, 1, 2, 2), torch.randint(0, 3, (8,))
    classifier.log_dict = lambda *args, **kwargs: None  # no Trainer attached
    loss = classifier.training_step((images, labels), 0)
    flat = images.flatten(1)
    expected = F.cross_entropy(classifier.model.main(flat), labels) + 0.3 * F.cross_entropy(classifier.model.aux(flat), labels)
    assert torch.allclose(loss, expected)
