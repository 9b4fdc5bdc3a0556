"""GradualPruning in a real Lightning Trainer: logged sparsity, final target, checkpointed masks; a GRU/LSTM's gate
matrices pruned, resumed exactly, and read back from the exported file."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_loader, make_trainer, tiny_mobilenet
from sparselite import GradualPruning, QuantizationAwareTraining, SparseliteError, export_tflite
from sparselite.models.classifier import ImageClassifier
from sparselite.pruning.pruner import MASK_BUFFER
from sparselite.tflite.constant_values import weight_sparsity

PRUNED = ["model.features.2.0", "model.features.4.0", "model.classifier"]


def read_metrics(trainer: pl.Trainer) -> list[dict[str, str]]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, fmnist_train):
    tmp_path = tmp_path_factory.mktemp("pruned_run")
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(tiny_mobilenet(), lr=5e-3)
    pruning = GradualPruning(final_sparsity=0.8, begin_step=0, end_step=12, frequency=4, min_params=100)
    trainer = make_trainer(tmp_path, max_steps=16, callbacks=[pruning])
    trainer.fit(module, make_loader(fmnist_train, 256))
    ckpt = tmp_path / "final.ckpt"
    trainer.save_checkpoint(ckpt)
    return trainer, module, pruning, ckpt


def test_sparsity_metrics_are_logged(pruned_run):
    trainer, _, _, _ = pruned_run
    rows = read_metrics(trainer)
    assert {f"sparsity/{name}" for name in PRUNED} <= set(rows[0])
    overall = {int(row["step"]): float(row["sparsity/overall"]) for row in rows if row.get("sparsity/overall")}
    # Lightning re-logs the last value between updates; it changes only on the beats (4, 8, 12).
    assert sorted(overall) == list(range(16))
    values = [overall[step] for step in sorted(overall)]
    assert values == sorted(values)
    assert overall[0] == 0.0 and overall[3] == 0.0 and 0.0 < overall[4] < overall[8] < overall[12]
    assert overall[12] == pytest.approx(0.8, abs=5e-3) and overall[15] == overall[12]
    per_layer = [float(row["sparsity/model.classifier"]) for row in rows if row.get("sparsity/model.classifier")]
    assert per_layer[-1] == pytest.approx(round(0.8 * 320) / 320)


def test_final_sparsity_equals_target(pruned_run):
    _, module, pruning, _ = pruned_run
    assert pruning.pruner.last_update_step == 12
    for name in PRUNED:
        layer = module.get_submodule(name)
        n = layer.weight.numel()
        mask = getattr(layer, MASK_BUFFER)
        assert int((~mask).sum()) == round(0.8 * n), name
        assert torch.equal(layer.weight[~mask], torch.zeros_like(layer.weight[~mask])), name
        assert pruning.pruner.sparsity()[name] == pytest.approx(0.8, abs=1 / n + 1e-9)


def test_masks_are_buffers_in_the_checkpoint(pruned_run):
    _, module, _, ckpt = pruned_run
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    state = checkpoint["state_dict"]
    for name in PRUNED:
        assert torch.equal(state[f"{name}.{MASK_BUFFER}"], getattr(module.get_submodule(name), MASK_BUFFER))
    (callback_state,) = [v for k, v in checkpoint["callbacks"].items() if "GradualPruning" in k]
    assert callback_state == {"last_update_step": 12}


def test_invalid_arguments_fail_at_construction():
    with pytest.raises(SparseliteError, match="final_sparsity=1.2"):
        GradualPruning(final_sparsity=1.2)
    with pytest.raises(SparseliteError, match="begin_step=10 must be below end_step=10"):
        GradualPruning(begin_step=10, end_step=10)
    with pytest.raises(SparseliteError, match="unknown layer policy 'fast'"):
        GradualPruning(policy="fast")
    with pytest.raises(SparseliteError, match="exclude pattern"):
        GradualPruning(exclude=["[a-"])


# ---------------------------------------------------------------------------------------------- recurrent layers


class SequenceClassifier(pl.LightningModule):
    """A GRU or LSTM over [N, 6 steps, 8 features] and a linear head on its last hidden state."""

    def __init__(self, recurrent: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = recurrent(8, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.rnn(x)
        return self.head(output[:, -1])

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        return F.cross_entropy(self(inputs), labels)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)  # momentum revives pruned weights unless re-masked


def sequences(n: int = 128) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(n, 6, 8, generator=generator), torch.randint(0, 4, (n,), generator=generator)
    return DataLoader(TensorDataset(inputs, labels), batch_size=32)  # 4 steps an epoch


def recurrent_pruning() -> GradualPruning:
    # min_params=256 takes both gate matrices (GRU: 384 and 768 weights) and leaves the 64-weight head.
    return GradualPruning(final_sparsity=0.8, begin_step=0, end_step=12, frequency=4, min_params=256)


@pytest.fixture(scope="module", params=[nn.GRU, nn.LSTM], ids=["gru", "lstm"])
def recurrent_run(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp(f"recurrent_{request.param.__name__}")
    pl.seed_everything(0, verbose=False)
    module, pruning = SequenceClassifier(request.param), recurrent_pruning()
    make_trainer(tmp_path, max_steps=16, callbacks=[pruning]).fit(module, sequences())
    return module, pruning, tmp_path


def test_recurrent_weights_reach_the_target_and_stay_pruned(recurrent_run):
    module, pruning, _ = recurrent_run
    assert list(pruning.pruner.layers) == ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]
    for name in ("weight_ih_l0", "weight_hh_l0"):
        weight, mask = getattr(module.rnn, name), getattr(module.rnn, f"{MASK_BUFFER}_{name}")
        assert int((~mask).sum()) == round(0.8 * weight.numel()), name
        # Four Adam steps after the last mask update (step 12): the pruned weights are still exactly zero.
        assert float((weight == 0).float().mean()) == pytest.approx(0.8, abs=1 / weight.numel()), name
        assert not bool(weight[~mask].any()), name
    assert not hasattr(module.rnn, MASK_BUFFER) and float((module.head.weight == 0).float().mean()) < 0.1


def test_exported_recurrent_weights_read_back_pruned(recurrent_run):
    """The converter writes each gate matrix as a FULLY_CONNECTED weight (the recurrent one shared by every
    time step): the export report and the file's constants both show the zeros."""
    module, _, tmp_path = recurrent_run
    path = tmp_path / "fp32.tflite"
    inputs = next(iter(sequences()))[0]
    report = export_tflite(module, inputs[:1], path, precision="fp32", verify_data=[inputs])
    assert {layer.layer for layer in report.layers} == {"rnn.weight_ih_l0", "rnn.weight_hh_l0"}
    for layer in report.layers:
        assert layer.sparsity_in_file == pytest.approx(layer.sparsity_in_training) and layer.sparsity_in_training > 0.79
    in_file = weight_sparsity(path)
    pruned = [module.rnn.weight_ih_l0, module.rnn.weight_hh_l0]
    assert sorted(in_file[layer.tensor] for layer in report.layers) == pytest.approx(
        sorted(float((w == 0).double().mean()) for w in pruned))


def test_dynamic_int8_file_keeps_the_recurrent_zeros(recurrent_run):
    module, _, tmp_path = recurrent_run
    inputs = next(iter(sequences()))[0]
    report = export_tflite(module, inputs[:1], tmp_path / "dynamic.tflite", precision="dynamic_int8", verify_data=None)
    assert report.layer_precisions == {"rnn": "dynamic_int8", "head": "dynamic_int8"}
    assert {layer.layer for layer in report.layers} == {"rnn.weight_ih_l0", "rnn.weight_hh_l0"}
    for layer in report.layers:  # int8 rounding may add zeros, never remove one
        assert layer.sparsity_in_training - 1e-6 <= layer.sparsity_in_file <= layer.sparsity_in_training + 0.02


def test_recurrent_masks_resume_exactly(tmp_path):
    pl.seed_everything(0, verbose=False)
    module_a, pruning_a = SequenceClassifier(nn.GRU), recurrent_pruning()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1, filename="{step}")
    make_trainer(tmp_path, 16, [pruning_a, checkpoint], checkpointing=True, name="a").fit(module_a, sequences())
    ckpt = tmp_path / "ckpt" / "step=8.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    pruned_at_8 = int((~saved[f"rnn.{MASK_BUFFER}_weight_hh_l0"]).sum())
    assert 0 < pruned_at_8 < int((~module_a.rnn.sparselite_mask_weight_hh_l0).sum())  # mid-schedule

    pl.seed_everything(123, verbose=False)  # another init: the masks and weights must come from the checkpoint
    module_b, pruning_b = SequenceClassifier(nn.GRU), recurrent_pruning()
    make_trainer(tmp_path, 16, [pruning_b], name="b").fit(module_b, sequences(), ckpt_path=ckpt)
    state_a, state_b = module_a.state_dict(), module_b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert not [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert pruning_b.pruner.last_update_step == pruning_a.pruner.last_update_step == 12


def test_recurrent_masks_hold_through_qat_into_a_fully_int8_file(tmp_path):
    """Fully int8 files keep a GRU in a float island (float_fallback): its fp32 gate matrices still show the zeros."""
    pl.seed_everything(0, verbose=False)
    module, pruning = SequenceClassifier(nn.GRU), recurrent_pruning()
    qat = QuantizationAwareTraining(begin_step=4, freeze_step=14)
    make_trainer(tmp_path, 16, [pruning, qat]).fit(module, sequences())
    inputs = next(iter(sequences()))[0]
    report = export_tflite(module, inputs[:1], tmp_path / "int8.tflite", float_fallback="xnnpack",
                           calibration_data=[inputs], verify_data=[inputs])
    assert {layer.layer for layer in report.layers} == {"rnn.weight_ih_l0", "rnn.weight_hh_l0"}
    for layer in report.layers:
        assert layer.sparsity_in_file == pytest.approx(layer.sparsity_in_training) == pytest.approx(0.8, abs=1e-3)
