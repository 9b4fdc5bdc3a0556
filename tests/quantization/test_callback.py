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


class PlainModule(pl.LightningModule):
    """A LightningModule as users write them: no example_input_array, a plain training_step."""

    def __init__(self) -> None:
        super().__init__()
        from model_blocks import InvertedResidualNet

        self.model = InvertedResidualNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, fmnist_train):
    tmp_path = tmp_path_factory.mktemp("plain_run")
    pl.seed_everything(0, verbose=False)
    module = PlainModule()
    qat = QuantizationAwareTraining(begin_step=20, freeze_step=50)
    make_trainer(tmp_path, max_steps=60, callbacks=[qat]).fit(module, make_loader(fmnist_train, 60 * 32))
    ckpt = tmp_path / "final.ckpt"
    torch.save({"state_dict": module.state_dict()}, ckpt)
    return module, qat, ckpt


def test_functional_ops_are_found_at_the_first_batch_without_example_input_array(plain_run):
    module, qat, _ = plain_run
    assert module.example_input_array is None
    assert qat.simulator.op_sites == ["sparselite_op_quant.model/block1/add_0", "sparselite_op_quant.model/block2/add_0"]
    assert set(qat.simulator.op_sites) <= set(learned_ranges(module))


def test_a_plain_module_exports_strictly_with_every_range_learned(plain_run, fmnist_heldout, tmp_path):
    from sparselite import export_tflite

    module, _, _ = plain_run
    images = fmnist_heldout[0]
    report = export_tflite(module, images[:1], tmp_path / "m.tflite", verify_data=[images[:256]])  # default gate
    assert report.ranges_calibrated == 0 and report.ranges_learned > 0  # no calibration data was given


def test_op_site_ranges_load_into_a_module_that_has_not_found_its_sites_yet(plain_run):
    module, _, ckpt = plain_run
    fresh = PlainModule()
    qat = QuantizationAwareTraining(begin_step=20, freeze_step=50)
    qat.prepare(fresh)
    assert not qat.simulator.op_sites_found
    fresh.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])  # strict: every key has its place
    assert learned_ranges(fresh) == learned_ranges(module)
    # The first batch then finds the same sites, keeping the loaded ranges.
    assert qat.simulator.find_op_sites((torch.zeros(1, 1, 28, 28),)) == module_sites(module)
    assert learned_ranges(fresh) == learned_ranges(module)


def module_sites(module: torch.nn.Module) -> list[str]:
    return [f"sparselite_op_quant.{key}" for key in module.sparselite_op_quant]


def test_batches_without_an_input_tensor_are_refused_with_one_line(tmp_path):
    class DictBatches(PlainModule):
        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch["image"]), batch["label"])

    data = [{"image": torch.zeros(2, 1, 28, 28), "label": torch.zeros(2, dtype=torch.long)}] * 2
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[QuantizationAwareTraining()])
    with pytest.raises(SparseliteError, match="the batch's first item is a dict"):
        trainer.fit(DictBatches(), data)
