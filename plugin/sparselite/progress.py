"""Training progress: plain-text lines for logs (Lightning's progress bars draw nothing useful when
stdout is not a terminal), and a sensible epoch title on the progress bar of a step-bounded run."""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_info


class LogProgress(pl.Callback):
    """One line every ``every`` optimizer steps: step, loss, and time per step."""

    def __init__(self, every: int = 100) -> None:
        self.every = every
        self._last = (0, time.perf_counter())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = (trainer.global_step, time.perf_counter())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every or step == self._last[0]:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        loss = float(loss) if loss is not None else float("nan")
        seconds = (time.perf_counter() - self._last[1]) / max(step - self._last[0], 1)
        total = trainer.max_steps if trainer.max_steps > 0 else "?"
        rank_zero_info(f"[sparselite] step {step}/{total}  loss {loss:.4f}  {seconds * 1e3:.0f} ms/step")
        self._last = (step, time.perf_counter())


class OpenEndedEpochTitle(pl.Callback):
    """A run bounded by ``max_steps`` alone has ``max_epochs == -1``, and Rich's progress bar then titles
    it "Epoch 2/-2". Title it "Epoch 2": the bar itself counts the steps."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bar = trainer.progress_bar_callback
        if not isinstance(bar, RichProgressBar) or trainer.max_epochs is None or trainer.max_epochs >= 0:
            return

        def title(current_epoch: int) -> str:
            # Padded like Lightning's own title, so the bar does not flicker against "Validation".
            return f"{f'Epoch {current_epoch}':{len(bar.validation_description)}}"

        bar._get_train_description = title  # where Lightning 2.6 builds the title


def default_callbacks() -> list[pl.Callback]:
    return [OpenEndedEpochTitle()] + ([] if sys.stdout.isatty() else [LogProgress()])
