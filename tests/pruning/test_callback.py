"""GradualPruning in a real Lightning Trainer: logged sparsity, final target, checkpointed masks."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from conftest import make_loader, make_trainer, tiny_mobilenet
from sparselite import GradualPruning, SparseliteError
from sparselite.models.classifier import ImageClassifier
from sparselite.pruning.pruner import MASK_BUFFER

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
