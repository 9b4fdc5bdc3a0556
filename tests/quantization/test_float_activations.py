"""QAT for float-activation precisions: training computes what the file computes, and the export follows it.

A conv + linear classifier trains in a real Lightning Trainer with ``QuantizationAwareTraining(precision=...)``;
the export, told no precision, writes what training simulated, and the trained model (its simulation on)
gives the file's outputs to float rounding.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_loader, make_trainer
from sparselite import QuantizationAwareTraining, SparseliteError, export_tflite
from sparselite.models.classifier import ImageClassifier
from sparselite.quantization.float_activations import simulated_precision, strip
from sparselite.runtime.litert import LiteRTModel


class ConvAndLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, stride=2)
        self.pointwise = nn.Conv2d(8, 16, 1)
        self.hidden = nn.Linear(16 * 13 * 13, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.pointwise(F.relu(self.conv(x))))
        return self.head(F.relu(self.hidden(x.flatten(1))))


@pytest.mark.parametrize("precision, written", [
    ("dynamic_int8", {"conv": "fp32", "pointwise": "dynamic_int8", "hidden": "dynamic_int8", "head": "dynamic_int8"}),
    ({"default": "dynamic_int8", r"model\.head": "fp16"},
     {"conv": "fp32", "pointwise": "dynamic_int8", "hidden": "dynamic_int8", "head": "fp16"}),
])
def test_training_simulates_the_file_and_the_export_follows_it(precision, written, fmnist_train, fmnist_heldout, tmp_path):
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(ConvAndLinears(), lr=3e-3)
    qat = QuantizationAwareTraining(begin_step=2, precision=precision)
    make_trainer(tmp_path, max_steps=8, callbacks=[qat]).fit(module, make_loader(fmnist_train, 256))
    assert simulated_precision(module) == precision and qat.simulator.enabled

    images = fmnist_heldout[0][:128]
    path = tmp_path / "m.tflite"
    report = export_tflite(module, images[:1], path, verify_data=[images])  # no precision: as trained
    # The one-channel conv becomes a DEPTHWISE_CONV_2D, which has no dynamic-range kernel: it stays fp32.
    assert report.precision == precision
    assert report.layer_precisions == {f"model.{layer}": chosen for layer, chosen in written.items()}

    module.eval()
    with torch.no_grad():
        simulated = module(images).numpy()
    got = LiteRTModel(path)(images.numpy())
    assert np.abs(got - simulated).max() < 1e-4 * np.abs(got).max()
    assert report.parity.max_logit_diff_lsb < 1e-4 * np.abs(got).max()


def test_the_simulation_rounds_inputs_and_weights_only_once_on():
    model = ConvAndLinears()
    qat = QuantizationAwareTraining(begin_step=5, precision="dynamic_int8")
    layers = qat.simulator.prepare(model)
    assert layers == ["pointwise", "hidden", "head"]  # the one-channel conv is depthwise in the file: fp32
    x = torch.randn(2, 1, 28, 28)
    float_out = ConvAndLinears.forward(model, x)  # the simulation is off before begin_step
    qat.simulator.step(4)
    assert torch.equal(model(x), float_out)
    qat.simulator.step(5)
    assert not torch.equal(model(x), float_out)
    strip(model)
    assert torch.equal(model(x), float_out) and simulated_precision(model) is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(precision="auto"), "precision='auto' is not a float-activation precision"),
    (dict(precision="dynamic_int8", freeze_step=10), "freeze_step and averaging_constant set activation ranges"),
    (dict(precision="int4"), "precision='int4' must be one of"),
])
def test_bad_precisions_fail_at_construction(kwargs, message):
    with pytest.raises(SparseliteError, match=message):
        QuantizationAwareTraining(**kwargs)


def test_a_depthwise_conv_cannot_train_dynamic_range():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(36, 10))
    with pytest.raises(SparseliteError, match="dynamic_int8 on depthwise conv"):
        QuantizationAwareTraining(precision="dynamic_int8").simulator.prepare(model)
