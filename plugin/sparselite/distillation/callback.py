"""``Distillation``: the Lightning adapter over ``Distiller``.

How the distillation loss reaches a ``training_step`` the callback cannot edit: at the start of fit the
callback puts a wrapper of the module's own ``training_step`` on the instance (``functools.wraps``, so
Lightning still sees the user's method and signature). The wrapper runs the user's step while the
student's forward hooks record its input and logits, then returns (1 - weight) * the user's loss +
weight * the distillation loss, before Lightning calls backward. Lightning reaches ``training_step``
through the instance (under DDP too: its forward redirection looks the method up by name), so the mix is
exact, in automatic optimization, with one backward. The wrapper is removed when fit ends or fails.

Other ways do not fit: ``on_before_backward`` sees the loss but cannot replace it; gradient hooks on the
logits would leave the logged loss without the distillation term and mis-scale the user's other terms.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from sparselite.distillation.distiller import Distiller, check_schedule
from sparselite.distillation.teacher import RunRebuilder, check_teacher_argument, fingerprint, resolve_teacher
from sparselite.errors import SparseliteError


class Distillation(pl.Callback):
    """The model being compressed (the student) learns the softened outputs of a float teacher (Hinton et al.).

    Works with any LightningModule, unchanged: its ``training_step`` computes its loss as always, and the
    callback mixes in the distillation loss (see the module docstring). The teacher is never trained
    (eval mode, no gradients, no optimizer state), stays float under QAT, keeps every channel under
    ``ChannelPruning``, runs once per batch on each rank, and is not saved in the student's checkpoint:
    the checkpoint holds where it came from and its fingerprint, and a resumed run refuses another one.

    Args:
        teacher: an ``nn.Module`` or LightningModule; a checkpoint path (tensors only: a file with pickled
            code is refused; under ``sparselite fit`` a checkpoint with its run's config.yaml is rebuilt from
            it, elsewhere it is loaded into a copy of the student: pass ``restore_run(path).module`` for
            another architecture); or
            ``"initial"``: a frozen float copy of the model as fit starts (fine-tuning from pretrained weights).
        temperature: softmax temperature T of both models' logits; the loss is scaled by T^2.
        weight: loss = (1 - weight) * your loss + weight * distillation loss, in (0, 1].
        begin_step / end_step: optimizer steps with distillation on (``end_step=None``: to the end).
        student: the module whose forward returns the logits: None (default) finds it in the first step (the
            LightningModule's forward if ``training_step`` calls ``self(x)``, else the one direct submodule it
            calls, e.g. ``self.model(x)``); '' or a submodule name to say so.
    """

    def __init__(self, teacher: str | nn.Module, temperature: float = 2.0, weight: float = 0.5,
                 begin_step: int = 0, end_step: int | None = None, student: str | None = None) -> None:
        # Everything checked now; the teacher file itself at setup (`sparselite export` parses a recipe
        # again after training, when the teacher file need not be there any more).
        self.source = check_teacher_argument(teacher)
        check_schedule(temperature, weight, begin_step, end_step)
        if student is not None and not isinstance(student, str):
            raise SparseliteError(f"student={student!r} must be a submodule name ('' = the LightningModule itself) "
                                  "or null (found in the first step)")
        self.teacher_argument = teacher
        self.temperature, self.weight = temperature, weight
        self.begin_step, self.end_step, self.student = begin_step, end_step, student
        self.distiller: Distiller | None = None
        self.fingerprint: str | None = None
        # Set by `sparselite fit` (lightning_cli): rebuilds a `sparselite fit` checkpoint from its config.yaml.
        self.rebuild_run: RunRebuilder | None = None
        self._restored: dict[str, Any] | None = None
        self._wrapped: tuple[pl.LightningModule, dict] | None = None

    @property
    def teacher(self) -> nn.Module | None:
        return self.distiller.teacher if self.distiller is not None else None

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise SparseliteError("Distillation adds its loss to the one training_step returns, which needs automatic "
                                  "optimization; with manual optimization add distillation.loss.kd_loss yourself")
        # Before checkpoint restore (so the fingerprint can be compared) and, for 'initial', before
        # training changes the weights.
        teacher = resolve_teacher(self.teacher_argument, pl_module, self.rebuild_run)
        self.distiller = Distiller(teacher, self.temperature, self.weight, self.begin_step, self.end_step)
        self.fingerprint = fingerprint(teacher)
        rank_zero_info(f"[sparselite] distilling from {self.source} (T={self.temperature:g}, weight={self.weight:g}, "
                       f"steps {self.begin_step}..{'end' if self.end_step is None else self.end_step})")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        teacher = self.distiller.teacher
        if trainer.world_size > 1:
            # Every rank runs its own teacher: make them one (a module or 'initial' built per rank need not agree).
            state = trainer.strategy.broadcast({k: v.cpu() for k, v in teacher.state_dict().items()}, src=0)
            teacher.load_state_dict(state)
            self.fingerprint = fingerprint(teacher)
        self._check_restored()
        teacher.to(pl_module.device)
        self.distiller.checked = False
        self.distiller.attach(pl_module, self.student)
        self._wrap_training_step(trainer, pl_module)

    def _check_restored(self) -> None:
        saved = self._restored
        if saved is None or saved.get("fingerprint") in (None, self.fingerprint):
            return
        raise SparseliteError(f"the teacher ({self.source}) is not the one this run started with ({saved.get('source')}: "
                              f"fingerprint {saved['fingerprint']}, now {self.fingerprint}); resume with the same teacher, "
                              "or start a new run")

    def _wrap_training_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        original = pl_module.training_step
        distiller = self.distiller

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            with distiller.capture():
                output = original(*args, **kwargs)
            return self._mix(output, trainer.global_step, pl_module)

        # The instance's own attribute, if it had one, comes back at the end.
        self._wrapped = (pl_module, {k: pl_module.__dict__[k] for k in ("training_step",) if k in pl_module.__dict__})
        pl_module.training_step = training_step

    def _mix(self, output: Any, step: int, pl_module: pl.LightningModule) -> Any:
        loss = output.get("loss") if isinstance(output, dict) else output
        if loss is None:  # the step is skipped (Lightning's convention)
            self.distiller.distillation_loss(step)  # still drops the captured calls
            return output
        distillation = self.distiller.distillation_loss(step)
        if distillation is None:
            return output
        pl_module.log("train/distillation_loss", distillation.detach(), on_step=True, on_epoch=False)
        mixed = self.distiller.add_precomputed(loss, distillation)
        return {**output, "loss": mixed} if isinstance(output, dict) else mixed

    def _unwrap(self) -> None:
        if self._wrapped is None:
            return
        pl_module, own = self._wrapped
        pl_module.__dict__.pop("training_step", None)
        pl_module.__dict__.update(own)
        self._wrapped = None
        if self.distiller is not None:
            self.distiller.detach()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._unwrap()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwrap()

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Where the teacher came from and its fingerprint: never its weights."""
        source = self.source if not isinstance(self.teacher_argument, (str, os.PathLike)) else str(self.teacher_argument)
        return {"source": source, "fingerprint": self.fingerprint}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)
