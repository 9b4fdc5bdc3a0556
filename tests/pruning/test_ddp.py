"""GradualPruning under DDP (2 CPU processes, gloo): every rank ends with the same masks, at the target."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from conftest import run_two_process_ddp

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from sparselite import GradualPruning  # before Lightning: makes torchvision importable (compat/torchvision.py)

    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from sparselite.data.fashion_mnist import load_split
    from sparselite.models.classifier import ImageClassifier
    from sparselite.models.mobilenet import MobileNetLite

    out = Path(sys.argv[1])


    class SaveMasks(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            masks = {n: b.clone() for n, b in pl_module.named_buffers() if n.endswith("sparselite_mask")}
            weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            torch.save({"masks": masks, "weights": weights, "world_size": trainer.world_size,
                        "sparsity": pruning.pruner.sparsity()}, out / f"rank{trainer.global_rank}.pt")


    if __name__ == "__main__":
        torch.set_num_threads(1)
        pl.seed_everything(0, verbose=False)
        images, labels = load_split("train")
        loader = DataLoader(TensorDataset(images[:512], labels[:512]), batch_size=32, shuffle=False)
        pruning = GradualPruning(final_sparsity=0.8, begin_step=0, end_step=6, frequency=2, min_params=100)
        model = MobileNetLite(stem_channels=8, blocks=((16, 1), (32, 2)))
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=8, callbacks=[pruning, SaveMasks()],
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(ImageClassifier(model, lr=5e-3), loader)
    """
)


@pytest.mark.slow
def test_ddp_ranks_end_with_identical_masks_at_target(tmp_path: Path):
    ranks = run_two_process_ddp(tmp_path, SCRIPT)
    assert all(rank["world_size"] == 2 for rank in ranks)
    masks0, masks1 = ranks[0]["masks"], ranks[1]["masks"]
    assert sorted(masks0) == ["model.classifier.sparselite_mask", "model.features.2.0.sparselite_mask",
                              "model.features.4.0.sparselite_mask"]
    for name in masks0:
        assert torch.equal(masks0[name], masks1[name]), name
        pruned = int((~masks0[name]).sum())
        assert pruned == round(0.8 * masks0[name].numel()), name
    # DDP keeps the weights in sync, which is what makes the per-rank masks agree.
    for name in ranks[0]["weights"]:
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
    assert ranks[0]["sparsity"]["overall"] == pytest.approx(0.8, abs=5e-3)
    assert ranks[0]["sparsity"] == ranks[1]["sparsity"]
