"""QuantizationAwareTraining in a real Lightning Trainer: phases by step, ranges in the checkpoint."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from conftest import make_loader, make_trainer, tiny_mobilenet
from sparselite import QuantizationAwareTraining, SparseliteError
from sparselite.models.classifier import ImageClassifier
from sparselite.quantization.fake_quant import ActivationFakeQuant
from sparselite.quantization.qat import learned_ranges


def test_invalid_arguments_fail_at_construction():
    with pytest.raises(SparseliteError, match="freeze_step=5 must be after begin_step=10"):
        QuantizationAwareTraining(begin_step=10, freeze_step=5)
    with pytest.raises(SparseliteError, match="averaging_constant=0"):
        QuantizationAwareTraining(averaging_constant=0)


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, fmnist_train):
    tmp_path = tmp_path_factory.mktemp("qat_run")
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(tiny_mobilenet(), lr=5e-3)
    qat = QuantizationAwareTraining(begin_step=4, freeze_step=8, averaging_constant=0.1)
    trainer = make_trainer(tmp_path, max_steps=12, callbacks=[qat])
    trainer.fit(module, make_loader(fmnist_train, 256))
    ckpt = tmp_path / "final.ckpt"
    trainer.save_checkpoint(ckpt)
    return module, qat, ckpt


def test_ranges_are_learned_and_frozen_after_freeze_step(qat_run):
    module, _, _ = qat_run
    quants = [m for m in module.modules() if isinstance(m, ActivationFakeQuant)]
    assert len(learned_ranges(module)) == len(quants) == 7  # the input + 6 convs/linear
    assert all(q.enabled and not q.observing for q in quants)
    # BatchNorm is never frozen in eval while training goes on (tests/quantization/test_freeze_stability.py).
    assert all(bn.training for bn in module.modules() if isinstance(bn, torch.nn.BatchNorm2d))


def test_checkpoint_ranges_load_into_a_fresh_run(qat_run):
    module, _, ckpt = qat_run
    fresh = ImageClassifier(tiny_mobilenet(), lr=5e-3)
    QuantizationAwareTraining(begin_step=4, freeze_step=8).prepare(fresh)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert learned_ranges(fresh) == learned_ranges(module)
