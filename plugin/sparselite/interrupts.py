"""SIGINT / SIGTERM during training: finish the current step, save a checkpoint, exit 130 / 143.

Lightning on its own exits 0 after SIGTERM (its ``SIGTERMException`` is a bare ``SystemExit``), so
``sparselite fit && deploy`` would ship the previous model, and SIGINT stops mid-step with exit 1.
``GracefulInterrupt`` records the signal, and at the end of the training step in flight saves a
checkpoint (which ``--ckpt_path`` resumes like any step checkpoint) and raises ``Interrupted``; the
CLI turns that into one line and the shell's exit code for the signal (128 + its number). A second
signal while the first is pending acts at once, the default way.

Lightning installs its own SIGTERM handler after the ``setup`` hook and checks the flag it sets at
several points of the loop, so if both handlers ran, whichever check came first would win, and
Lightning's exits 0 without a checkpoint. From the first hook after that (the sanity check, or the
start of training), this callback puts its handler back in place of Lightning's: the signal is
handled once, here. (Lightning's handler only sets that flag, plus a log line under SLURM
auto-requeue.)
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl

from sparselite.stopping import Stopped

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Stopped):
    """Training stopped on a signal. A BaseException, so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        super().__init__(f"{signal.Signals(signum).name} at step {step}; checkpoint saved to {checkpoint}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class GracefulInterrupt(pl.Callback):
    """Stop on SIGINT/SIGTERM at a step boundary with a resumable checkpoint (see the module docstring)."""

    def __init__(self, filename: str = "interrupted.ckpt") -> None:
        self.filename = filename
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._outer: dict[int, Any] = {}  # the handlers before training (the CLI's), kept after _restore

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.signum = None
        try:
            self._previous = {s: signal.signal(s, self._record) for s in HANDLED}
            # (Lightning may have left this handler in place after an earlier fit: not an outer one.)
            self._outer = {s: self._outer.get(s) if h == self._record else h for s, h in self._previous.items()}
        except ValueError:  # not the main thread: signals are not ours to take
            self._previous = {}

    # The first hooks after Lightning installs its handler (the sanity check runs only with validation).
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_over_from_lightning()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_over_from_lightning()
        self._stop_if_signalled(trainer)

    def _take_over_from_lightning(self) -> None:
        if self._previous:  # Lightning's handler has called ours since it was installed: replace it
            for signum in HANDLED:
                signal.signal(signum, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # Asked twice: stop now, the default way. After training (Lightning may put this handler back
        # when it tears down its own): the handler from before training answers, else the default.
        if self.signum is not None or not self._previous:
            outer = self._outer.get(signum)
            self._restore()
            if self.signum is None and callable(outer):
                # After training: the handler the run started with (the CLI's) answers, as if training had
                # never taken the signal over.
                signal.signal(signum, outer)
                outer(signum, frame)
                return
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signum = signum

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._stop_if_signalled(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_signalled(trainer)  # a signal after the epoch's last batch

    def _stop_if_signalled(self, trainer: pl.Trainer) -> None:
        if self.signum is None:
            return
        folder = Path(trainer.checkpoint_callback.dirpath) if getattr(trainer.checkpoint_callback, "dirpath", None) \
            else Path(trainer.default_root_dir) / "checkpoints"
        path = folder / self.filename
        trainer.save_checkpoint(path, weights_only=False)  # the full state --ckpt_path resumes (said, not logged)
        raise Interrupted(self.signum, trainer.global_step, path)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
