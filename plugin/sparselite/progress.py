"""Plain-text training progress for logs: Lightning's progress bars draw nothing when stdout is not a terminal."""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning.pytorch as pl
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


def default_callbacks() -> list[pl.Callback]:
    return [] if sys.stdout.isatty() else [LogProgress()]
