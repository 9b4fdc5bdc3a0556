"""Pruning + QAT + Distillation resumed from a mid-schedule checkpoint: the same end state as one run; the
teacher is found again from the path the checkpoint keeps, and a changed teacher is refused."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from conftest import fit_with_checkpoint_at, make_loader, make_trainer, tiny_mobilenet
from distillation.helpers import student
from sparselite import Distillation, GradualPruning, QuantizationAwareTraining, SparseliteError
from sparselite.models.classifier import ImageClassifier

TOTAL, RESUME = 24, 16  # 8 batches per epoch: the checkpoint ends epoch 2


def callbacks(teacher_path) -> list:
    return [
        GradualPruning(final_sparsity=0.75, begin_step=2, end_step=20, frequency=3, min_params=100),
        QuantizationAwareTraining(begin_step=4, freeze_step=18, averaging_constant=0.1),
        Distillation(teacher=str(teacher_path), temperature=2.0, weight=0.5, begin_step=1),
    ]


@pytest.fixture
def teacher_path(tmp_path):
    teacher = student(seed=1)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.mul_(1.5)
    torch.save({"state_dict": teacher.state_dict()}, tmp_path / "teacher.ckpt")
    return tmp_path / "teacher.ckpt"


def test_resume_matches_uninterrupted_run_exactly(tmp_path, fmnist_train, teacher_path):
    module_a, ckpt = fit_with_checkpoint_at(tmp_path, callbacks(teacher_path), TOTAL, RESUME,
                                            make_loader(fmnist_train, 256))
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("Distillation")]
    assert state == {"source": str(teacher_path), "fingerprint": state["fingerprint"]}  # no teacher weights
    assert not any(k.startswith("teacher") for k in saved["state_dict"])

    pl.seed_everything(123, verbose=False)  # different init: everything must come from the checkpoint
    module_b = ImageClassifier(tiny_mobilenet(), lr=5e-3)
    trainer_b = make_trainer(tmp_path, TOTAL, callbacks(teacher_path), name="b")
    trainer_b.fit(module_b, make_loader(fmnist_train, 256), ckpt_path=ckpt)
    assert trainer_b.global_step == TOTAL
    state_a, state_b = module_a.state_dict(), module_b.state_dict()
    assert state_a.keys() == state_b.keys()
    mismatched = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert not mismatched, f"weights/buffers differ after resume: {mismatched[:5]}"


def test_resume_with_another_teacher_is_refused(tmp_path, fmnist_train, teacher_path):
    _, ckpt = fit_with_checkpoint_at(tmp_path, callbacks(teacher_path), 4, 2, make_loader(fmnist_train, 64))
    other = student(seed=2)
    torch.save({"state_dict": other.state_dict()}, teacher_path)  # the file was overwritten since
    with pytest.raises(SparseliteError, match="is not the one this run started with"):
        make_trainer(tmp_path, 4, callbacks(teacher_path), name="b").fit(student(), make_loader(fmnist_train, 64),
                                                                        ckpt_path=ckpt)
