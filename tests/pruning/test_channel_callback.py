"""ChannelPruning in a real Lightning Trainer: removal at end_step, exact resume across the shrink,
composition with unstructured pruning + QAT + int8 export, and recipe-order errors."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from conftest import fit_with_checkpoint_at, make_loader, make_trainer, tiny_mobilenet
from sparselite import ChannelPruning, GradualPruning, QuantizationAwareTraining, SparseliteError, export_tflite
from sparselite.models.classifier import ImageClassifier
from sparselite.models.mobilenet import MobileNetLite
from sparselite.pruning.dependency import count_macs_and_params
from sparselite.pruning.channels import CHANNEL_MASK, PLAN_KEY
from sparselite.pruning.pruner import MASK_BUFFER
from sparselite.quantization.qat import learned_ranges
from test_resume import ResumableLoader

TOTAL = 24  # 8 batches per epoch
CHANNEL_END = 6


def recipe() -> list:
    """Channels to 50% by step 6 (removed there), then 50% unstructured of what remains, with QAT from step 8."""
    return [
        ChannelPruning(final_sparsity=0.5, begin_step=0, end_step=CHANNEL_END, frequency=2),
        GradualPruning(final_sparsity=0.5, begin_step=6, end_step=14, frequency=2, min_params=100),
        QuantizationAwareTraining(begin_step=8, freeze_step=20, averaging_constant=0.1),
    ]


def out_channels(module: torch.nn.Module) -> list[int]:
    return [m.out_channels for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.fixture(scope="module")
def composed_run(tmp_path_factory, fmnist_train):
    tmp_path = tmp_path_factory.mktemp("channels")
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(tiny_mobilenet(), lr=5e-3)
    callbacks = recipe()
    trainer = make_trainer(tmp_path, TOTAL, callbacks)
    trainer.fit(module, make_loader(fmnist_train, 256))
    images = fmnist_train[0]
    # 24 training steps: on 64 examples a flip or two of near-tied predictions is noise, not a broken export.
    report = export_tflite(module, images[:1], tmp_path / "model.tflite", calibration_data=[images[256:288]],
                           verify_data=[images[288:352]], min_agreement=0.9)
    return trainer, module, callbacks, report, tmp_path


def test_channels_are_removed_at_end_step(composed_run):
    _, module, callbacks, _, _ = composed_run
    channels = callbacks[0]
    assert channels.pruner.shrunk and channels.pruner.last_update_step == CHANNEL_END
    # tiny MobileNetLite: stem 8 (at the minimum: kept), blocks 16 and 32 -> 8 and 16.
    assert out_channels(module) == [8, 8, 8, 8, 16]
    assert module.model.classifier.in_features == 16 and module.model.classifier.out_features == 10
    assert not any(CHANNEL_MASK in m._buffers for m in module.modules())
    assert PLAN_KEY in module.state_dict()


def test_unstructured_pruning_and_qat_run_on_the_shrunk_model(composed_run):
    _, module, callbacks, _, _ = composed_run
    unstructured = callbacks[1].pruner
    for name, layer in unstructured.layers.items():
        assert layer.mask.shape == layer.module.weight.shape, name
        assert unstructured.sparsity()[name] == pytest.approx(0.5, abs=0.02), name
    assert callbacks[2].simulator.model is module and len(learned_ranges(module)) > 1


def test_the_int8_export_of_the_shrunk_model_is_verified(composed_run):
    _, _, _, report, tmp_path = composed_run
    from sparselite.runtime.litert import LiteRTModel

    assert report.parity is not None and report.parity.reference == "fake-quant"
    runtime = LiteRTModel(tmp_path / "model.tflite")
    assert runtime(np.zeros((3, 1, 28, 28), np.float32)).shape == (3, 10)


@pytest.mark.parametrize("resume_step", [4, 12], ids=["before_shrink", "after_shrink"])
def test_resume_matches_uninterrupted_run_exactly(tmp_path, fmnist_train, resume_step):
    make = lambda: ResumableLoader(make_loader(fmnist_train, 256))  # noqa: E731

    callbacks_a = recipe()
    module_a, ckpt = fit_with_checkpoint_at(tmp_path, callbacks_a, TOTAL, resume_step, make())
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert (PLAN_KEY in saved["state_dict"]) == (resume_step > CHANNEL_END)

    pl.seed_everything(123, verbose=False)  # different init: everything must come from the checkpoint
    module_b = ImageClassifier(tiny_mobilenet(), lr=5e-3)
    callbacks_b = recipe()
    trainer_b = make_trainer(tmp_path, TOTAL, callbacks_b, name="b")
    trainer_b.fit(module_b, make(), ckpt_path=ckpt)
    assert trainer_b.global_step == TOTAL

    state_a, state_b = module_a.state_dict(), module_b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert state_a[PLAN_KEY] == state_b[PLAN_KEY]
    assert any(k.endswith(MASK_BUFFER) for k in state_a)
    mismatched = [k for k in state_a if k != PLAN_KEY and not torch.equal(state_a[k], state_b[k])]
    assert not mismatched, f"weights/buffers differ after resume: {mismatched[:5]}"


def test_qat_starting_before_the_channels_are_removed_is_refused(tmp_path, fmnist_train):
    module = ImageClassifier(tiny_mobilenet())
    callbacks = [ChannelPruning(end_step=10, frequency=5), QuantizationAwareTraining(begin_step=5)]
    trainer = make_trainer(tmp_path, 2, callbacks)
    with pytest.raises(SparseliteError, match="set begin_step > 10"):
        trainer.fit(module, make_loader(fmnist_train, 64))


def test_invalid_arguments_fail_at_construction():
    with pytest.raises(SparseliteError, match="final_sparsity=1.0"):
        ChannelPruning(final_sparsity=1.0)
    with pytest.raises(SparseliteError, match="importance='taylor'"):
        ChannelPruning(importance="taylor")
    with pytest.raises(SparseliteError, match="min_channels=0"):
        ChannelPruning(min_channels=0)


def test_export_report_shows_params_macs_and_latency_before_and_after(composed_run, fmnist_train):
    from sparselite.export.channel_report import compare_with_unpruned

    _, _, callbacks, report, tmp_path = composed_run
    numbers = compare_with_unpruned(callbacks[0].pruner, fmnist_train[0][:1], tmp_path / "model.tflite",
                                    [fmnist_train[0][256:288]], rounds=2, runs_per_round=5)
    assert numbers["params_after"] < 0.6 * numbers["params_before"]
    # The QAT-prepared, shrunk model counts as a float model of its widths would (its stem stays at 8).
    shrunk = ImageClassifier(MobileNetLite(stem_channels=8, blocks=((8, 1), (16, 2))), lr=5e-3)
    assert numbers["macs_after"] == count_macs_and_params(shrunk, fmnist_train[0][:1])[0]
    assert numbers["mac_ratio"] == numbers["macs_after"] / numbers["macs_before"] < 0.7
    assert numbers["latency_ms_before"] > 0 and numbers["latency_ms_after"] > 0
    report.channels = numbers
    assert "channel pruning: params" in report.summary() and report.to_dict()["channels"] == numbers
