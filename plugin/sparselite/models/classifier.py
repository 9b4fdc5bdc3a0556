"""``ImageClassifier``: the LightningModule the recipes train (cross-entropy, SGD/AdamW, cosine LR)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from sparselite.errors import SparseliteError


AUXILIARY_LOSS_WEIGHT = 0.3


class ImageClassifier(pl.LightningModule):
    """Wraps any image classifier ``nn.Module`` (one that returns logits, or logits and auxiliary logits).

    Args:
        model: the network (``class_path``/``init_args`` in YAML).
        lr: peak learning rate; cosine-decayed to 0 over ``trainer.max_steps``.
        weight_decay: decoupled weight decay (AdamW).
        input_shape: [C, H, W] of one example, used for export.
    """

    def __init__(self, model: nn.Module, lr: float = 3e-3, weight_decay: float = 1e-4,
                 input_shape: tuple[int, int, int] = (1, 28, 28)) -> None:
        super().__init__()
        # NaN passes every "<= 0" test and inf trains to nothing ("final sparsity 0.0%"): check finiteness.
        if not _finite(lr) or lr <= 0:
            raise SparseliteError(f"lr={lr!r} must be a finite number > 0")
        if not _finite(weight_decay) or weight_decay < 0:
            raise SparseliteError(f"weight_decay={weight_decay!r} must be a finite number >= 0")
        shape = tuple(input_shape) if isinstance(input_shape, (list, tuple)) else ()
        if len(shape) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 4096 for d in shape):
            raise SparseliteError(f"input_shape={input_shape!r} must be (channels, height, width), each in [1, 4096]")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.example_input_array = torch.zeros(1, *input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        auxiliary: tuple = ()
        if isinstance(logits, (tuple, list)):
            # GoogLeNet and Inception v3 return (logits, auxiliary logits...) in training mode: the
            # auxiliary classifiers add to the loss with GoogLeNet's weight 0.3 (they are gone in eval
            # mode, so export never sees them).
            logits, auxiliary = logits[0], tuple(a for a in logits[1:] if isinstance(a, torch.Tensor))
        loss = F.cross_entropy(logits, labels) + sum(AUXILIARY_LOSS_WEIGHT * F.cross_entropy(a, labels) for a in auxiliary)
        acc = (logits.argmax(1) == labels).float().mean()
        self.log_dict({f"{stage}/loss": loss, f"{stage}/acc": acc}, prog_bar=stage != "train", on_epoch=stage != "train", on_step=stage == "train")
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        optimizer, scheduler = adamw_one_cycle(self.parameters(), int(total), self.hparams.lr, self.hparams.weight_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def adamw_one_cycle(parameters, steps: int, lr: float, weight_decay: float):
    """(AdamW, one-cycle LR stepped every optimizer step) for a run of ``steps`` steps: the classifier's
    optimizer, also used by the plain-PyTorch loops of the benchmarks."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps + 1, pct_start=0.15)
    return optimizer, scheduler


@torch.no_grad()
def top1_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of a torch classifier in eval mode, in batches; its train/eval mode is restored."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
                  for i in range(0, len(images), batch_size))
    model.train(was_training)
    return correct / len(images)
