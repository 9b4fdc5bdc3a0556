"""Distillation under DDP (2 CPU processes, gloo): every rank runs the same frozen teacher, in eval mode, its
BatchNorm statistics unmoved, and the ranks end with the same student."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from conftest import run_two_process_ddp

SCRIPT = textwrap.dedent(
    """
    import os
    import sys
    from pathlib import Path

    from sparselite import Distillation, GradualPruning  # before Lightning (compat/torchvision.py)

    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from sparselite.data.fashion_mnist import load_split
    from sparselite.models.classifier import ImageClassifier
    from sparselite.models.mobilenet import MobileNetLite

    out = Path(sys.argv[1])


    class Save(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.teacher_start = {k: v.clone() for k, v in distillation.teacher.state_dict().items()}

        def on_train_end(self, trainer, pl_module):
            torch.save({"weights": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
                        "teacher_start": self.teacher_start, "teacher_end": distillation.teacher.state_dict(),
                        "teacher_training": [m.training for m in distillation.teacher.modules()],
                        "teacher_calls": calls, "world_size": trainer.world_size,
                        "teacher_in_student": any(m is distillation.teacher for m in pl_module.modules())},
                       out / f"rank{trainer.global_rank}.pt")


    if __name__ == "__main__":
        torch.set_num_threads(1)
        # Each rank builds its model from another seed: DDP makes the students one, and the callback must
        # make the 'initial' teachers one too.
        torch.manual_seed(int(os.environ.get("LOCAL_RANK", 0)))
        images, labels = load_split("train")
        loader = DataLoader(TensorDataset(images[:512], labels[:512]), batch_size=32, shuffle=False)
        distillation = Distillation(teacher="initial", weight=0.5)
        calls = []
        pruning = GradualPruning(final_sparsity=0.5, begin_step=0, end_step=4, frequency=2, min_params=100)
        model = MobileNetLite(stem_channels=8, blocks=((16, 1), (32, 2)))
        module = ImageClassifier(model, lr=5e-3)
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6,
                             callbacks=[pruning, distillation, Save()], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             num_sanity_val_steps=0)
        class CountCalls(pl.Callback):
            def on_train_start(self, trainer, pl_module):
                distillation.teacher.register_forward_hook(lambda m, i, o: calls.append(m.training))
        trainer.callbacks.insert(0, CountCalls())
        trainer.fit(module, loader)
    """
)


@pytest.mark.slow
def test_ddp_ranks_share_one_frozen_teacher(tmp_path: Path):
    ranks = run_two_process_ddp(tmp_path, SCRIPT)
    assert all(rank["world_size"] == 2 for rank in ranks)
    for name in ranks[0]["teacher_end"]:
        # The same teacher on both ranks (rank 0's), unchanged by training: BN running statistics included.
        assert torch.equal(ranks[0]["teacher_end"][name], ranks[1]["teacher_end"][name]), name
        for rank in ranks:
            assert torch.equal(rank["teacher_start"][name], rank["teacher_end"][name]), name
    for name in ranks[0]["weights"]:
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
    for rank in ranks:
        assert rank["teacher_calls"] == [False] * 6  # once per batch on each rank, in eval mode
        assert not any(rank["teacher_training"]) and not rank["teacher_in_student"]
