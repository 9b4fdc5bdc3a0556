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
from model_blocks import TFSameConv2d
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


class PaddedAndPatched(nn.Module):
    """A conv that pads as TensorFlow's SAME from its input size (timm's Conv2dSame) and a patch embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.same = TFSameConv2d(4, 8, 3, 2)
        self.patches = nn.Conv2d(8, 16, 2, 2)
        self.head = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.patches(F.relu(self.same(F.relu(self.stem(x))))))
        return self.head(x.flatten(1))


@pytest.mark.parametrize("precision", ["dynamic_int8", "fp16"])
def test_library_padding_and_patch_embeddings_train_as_the_file_computes_them(precision, fmnist_train, fmnist_heldout, tmp_path):
    """The TF-same conv pads before its simulated product (it did not: the shapes failed); the patch embedding,
    a SPACE_TO_DEPTH and a 1x1 conv in the file, rounds its input per patch."""
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(PaddedAndPatched(), lr=3e-3)
    qat = QuantizationAwareTraining(begin_step=2, precision=precision)
    make_trainer(tmp_path, max_steps=8, callbacks=[qat]).fit(module, make_loader(fmnist_train, 256))
    assert {"model.same", "model.patches"} <= set(qat.simulator.simulated)

    images = fmnist_heldout[0][:128]
    path = tmp_path / "m.tflite"
    report = export_tflite(module, images[:1], path, verify_data=[images])
    module.eval()
    with torch.no_grad():
        simulated = module(images).numpy()
    got = LiteRTModel(path)(images.numpy())
    # Float rounding flips an input's rounding here and there (0.7% of the logits moved, by <= 2e-4 of the
    # largest); rounded per image, the patch embedding moved 99% of them, by up to 3e-3.
    off = np.abs(got - simulated) / np.abs(got).max()
    assert off.max() < 1e-3 and (off > 1e-5).mean() < 0.05, (off.max(), (off > 1e-5).mean())
    assert report.layer_precisions["model.patches"] == precision


class RowReader(nn.Module):
    """Reads an image row by row with a recurrent layer and classifies its last output."""

    def __init__(self, recurrent: nn.Module) -> None:
        super().__init__()
        self.recurrent = recurrent
        self.head = nn.Linear(recurrent.hidden_size * (2 if recurrent.bidirectional else 1), 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.recurrent(x.flatten(1, 2))[0][:, -1])


@pytest.mark.parametrize("recurrent", [lambda: nn.GRU(28, 16, batch_first=True),
                                       lambda: nn.LSTM(28, 12, batch_first=True, bidirectional=True),
                                       lambda: nn.RNN(28, 16, batch_first=True)],
                         ids=["gru", "bidirectional_lstm", "rnn"])
def test_a_recurrent_layer_trains_step_by_step_as_the_file_computes_it(recurrent, fmnist_train, fmnist_heldout, tmp_path):
    """XNNPACK rounds each step's input and hidden state per row; training does the same, step by step."""
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(RowReader(recurrent()), lr=3e-3)
    qat = QuantizationAwareTraining(begin_step=2, precision="dynamic_int8")
    make_trainer(tmp_path, max_steps=6, callbacks=[qat]).fit(module, make_loader(fmnist_train, 256))
    assert qat.simulator.simulated == ["model.recurrent", "model.head"]

    images = fmnist_heldout[0][:64]
    path = tmp_path / "m.tflite"
    report = export_tflite(module, images[:1], path, verify_data=[images])
    assert report.layer_precisions == {"model.recurrent": "dynamic_int8", "model.head": "dynamic_int8"}
    module.eval()
    with torch.no_grad():
        simulated, float_out = module(images).numpy(), ImageClassifier.forward(_stripped(module), images).numpy()
    got = LiteRTModel(path)(images.numpy())
    assert np.abs(got - simulated).max() < 1e-4 * np.abs(got).max()
    assert np.abs(got - float_out).max() > 1e-3 * np.abs(got).max()  # what the simulation stands for


def _stripped(module: nn.Module) -> nn.Module:
    import copy

    copied = copy.deepcopy(module)
    strip(copied)
    return copied


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
    (dict(precision={"default": "int8", "head": "dynamic_int8"}), "a mapping whose default is 'int8' is for the export"),
])
def test_bad_precisions_fail_at_construction(kwargs, message):
    with pytest.raises(SparseliteError, match=message):
        QuantizationAwareTraining(**kwargs)


def test_a_depthwise_conv_cannot_train_dynamic_range():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(36, 10))
    with pytest.raises(SparseliteError, match="dynamic_int8 on depthwise conv"):
        QuantizationAwareTraining(precision="dynamic_int8").simulator.prepare(model)
