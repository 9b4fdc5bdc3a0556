"""Shared pieces of the distillation tests: a trained tiny teacher, and a recorder of what Lightning backprops."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from conftest import make_loader, make_trainer, tiny_mobilenet
from sparselite.models.classifier import ImageClassifier


def train_teacher(tmp_path, data, steps: int = 16) -> ImageClassifier:
    """The tiny MobileNetLite (seed 1) trained a few steps: a teacher whose outputs differ from a fresh student's."""
    pl.seed_everything(1, verbose=False)
    teacher = ImageClassifier(tiny_mobilenet(), lr=5e-3)
    make_trainer(tmp_path, steps, [], name="teacher").fit(teacher, make_loader(data, 512))
    return teacher


def student(seed: int = 0) -> ImageClassifier:
    pl.seed_everything(seed, verbose=False)
    return ImageClassifier(tiny_mobilenet(), lr=5e-3)


class RecordLoss(pl.Callback):
    """The loss Lightning backprops at each step, and the model's weights before the first step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.first_weights: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_weights is None:
            self.first_weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.losses.append(float(loss.detach()))


def batchnorm_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k or "num_batches" in k}
