"""``Distiller``: distillation without Lightning. Capture the student's outputs, run the teacher on the
same input, add the loss on its schedule.

    distiller = Distiller(teacher, temperature=2.0, weight=0.5)
    distiller.attach(model)                     # hooks on the student; the teacher stays outside it
    with distiller.capture():
        loss = F.cross_entropy(model(x), y)     # the user's loss, computed as always
    loss = distiller.add(loss, step)            # (1 - w) * loss + w * kd while the schedule is on
    loss.backward()

Why hooks and not a new loss function: the loss stays the user's own code (any LightningModule's
``training_step`` works unchanged), and the hooks see exactly what the student computed, on exactly the
input it got: a forward pre-hook, placed ahead of every other pre-hook (QAT's input fake-quant among them),
records the raw input; a forward hook records the output, still attached to the graph. The teacher runs on
that input once per student call, under ``torch.no_grad``, after the user's loss is computed and before
backward, so the mixed loss is exact and backward runs once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparselite.distillation.loss import kd_loss, logits_of, mixed_loss
from sparselite.distillation.teacher import inference_form
from sparselite.errors import SparseliteError
from sparselite.hook_ids import hook_ids_apart


def check_schedule(temperature: float, weight: float, begin_step: int, end_step: int | None) -> None:
    """Refuse bad arguments with one line saying what to change."""
    if not _number(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise SparseliteError(f"temperature={temperature!r} must be a finite number > 0 (1 = the plain softmax; "
                              "Hinton et al. use 2-20)")
    if not _number(weight) or not 0.0 < weight <= 1.0:
        raise SparseliteError(f"weight={weight!r} must be in (0, 1]: the share of the distillation loss in "
                              "(1 - weight) * your loss + weight * kd; leave the callback out for none")
    if not _whole(begin_step) or begin_step < 0:
        raise SparseliteError(f"begin_step={begin_step!r} must be a whole number >= 0")
    if end_step is not None and (not _whole(end_step) or end_step <= begin_step):
        raise SparseliteError(f"end_step={end_step!r} must be a whole number above begin_step={begin_step}, "
                              "or null (to the end of training)")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class _Call:
    name: str  # the student module's name under the root ('' = the root)
    args: tuple
    kwargs: dict
    output: Any = None


@dataclass
class _Capture:
    calls: list[_Call] = field(default_factory=list)
    open: dict[int, list[_Call]] = field(default_factory=dict)  # calls whose forward has not returned yet


class Distiller:
    """Adds ``weight`` * the Hinton loss of the student's logits against a frozen teacher's.

    Args:
        teacher: the teacher module (``teacher.resolve_teacher`` finds and freezes one).
        temperature / weight: see ``loss.py``.
        begin_step / end_step: the steps (optimizer steps, as the other callbacks count) with distillation on;
            ``end_step=None``: to the end. Outside them the loss is the user's alone and the teacher does not run
            (except once, at the first step, to check its output shape).
    """

    def __init__(self, teacher: nn.Module, temperature: float = 2.0, weight: float = 0.5, begin_step: int = 0,
                 end_step: int | None = None) -> None:
        check_schedule(temperature, weight, begin_step, end_step)
        self.teacher = teacher
        self.temperature, self.weight = float(temperature), float(weight)
        self.begin_step, self.end_step = begin_step, end_step
        self.student: str | None = None  # decided by ``attach`` or at the first captured step
        self.checked = False  # the teacher's output shape was compared with the student's
        self._root: nn.Module | None = None
        self._handles: list = []
        self._capture: _Capture | None = None
        self._calls: list[_Call] = []
        self._runs: dict[str, nn.Module] = {}  # the teacher module of a student name -> its inference form

    # ------------------------------------------------------------------ hooks
    def attach(self, root: nn.Module, student: str | None = "") -> None:
        """Hook the student: ``root`` itself (``student=''``), its submodule ``student``, or (None) whichever is
        called in the step: the root if its forward runs, else the one direct child that returns logits."""
        self.detach()
        self._root, self.student = root, student
        self._runs = {}  # built again at first use: the teacher may have moved or been reloaded since
        names = [student] if student is not None else ["", *(name for name, _ in root.named_children())]
        with hook_ids_apart(root):  # keys apart from a pickled model's own (hook_ids.py)
            for name in names:
                try:
                    module = root.get_submodule(name)
                except AttributeError:
                    raise SparseliteError(f"student={name!r} is not a submodule of {type(root).__name__}; name the "
                                          "submodule whose forward returns the logits (e.g. 'model'), or '' for the "
                                          "LightningModule itself") from None
                self._handles.append(module.register_forward_pre_hook(self._record_input(name), prepend=True,
                                                                      with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._record_output(name)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record_input(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._capture is not None:
                self._capture.open.setdefault(id(module), []).append(_Call(name, args, dict(kwargs)))
        return hook

    def _record_output(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._capture is not None and self._capture.open.get(id(module)):
                call = self._capture.open[id(module)].pop()
                call.output = output
                self._capture.calls.append(call)
        return hook

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Record the student's calls made inside (one training step)."""
        self._capture = _Capture()
        try:
            yield
        finally:
            self._calls, self._capture = self._capture.calls, None

    # ------------------------------------------------------------------ loss
    def active(self, step: int) -> bool:
        return step >= self.begin_step and (self.end_step is None or step < self.end_step)

    def add(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The user's ``loss`` mixed with the distillation loss of the calls just captured (``loss`` unchanged
        outside the schedule)."""
        distillation = self.distillation_loss(step)
        return loss if distillation is None else self.add_precomputed(loss, distillation)

    def add_precomputed(self, loss: torch.Tensor, distillation: torch.Tensor) -> torch.Tensor:
        return mixed_loss(loss, distillation, self.weight)

    def distillation_loss(self, step: int) -> torch.Tensor | None:
        """The mean distillation loss over the student calls of the last ``capture`` (None outside the
        schedule). The first call also checks the teacher's output shape against the student's."""
        calls = self._student_calls(self._calls)
        self._calls = []
        if not self.active(step) and self.checked:
            return None
        losses = []
        for call in calls:
            student = logits_of(call.output)
            teacher = self.teacher_logits(call)
            if not self.checked:
                if teacher.shape != student.shape:
                    raise SparseliteError(f"the teacher's output {tuple(teacher.shape)} does not match the student's "
                                          f"{tuple(student.shape)}: the teacher must compute the same logits (same "
                                          "classes) from the same input")
                self.checked = True
                if not self.active(step):
                    return None
            losses.append(kd_loss(student, teacher, self.temperature))
        return torch.stack(losses).mean() if losses else None

    @torch.no_grad()
    def teacher_logits(self, call: _Call) -> torch.Tensor:
        if call.name not in self._runs:
            self._runs[call.name] = inference_form(self.teacher_for(call.name))
        teacher = self._runs[call.name]
        teacher.train(False)  # stays in eval mode, even if someone called .train() on it
        return logits_of(teacher(*call.args, **call.kwargs))

    def teacher_for(self, name: str) -> nn.Module:
        """The teacher mirrors the student: when the student is a LightningModule's submodule (``self.model(x)``
        in ``training_step``) and the teacher is a LightningModule with that submodule, that submodule teaches."""
        if name and _is_lightning_module(self.teacher):
            try:
                return self.teacher.get_submodule(name)
            except AttributeError:
                pass
        return self.teacher

    def _student_calls(self, calls: Sequence[_Call]) -> list[_Call]:
        if self.student is None:  # first step with auto-detection: decide which module is the student
            self.student = self._choose_student(calls)
            if self._root is not None:
                self.attach(self._root, self.student)
        calls = [c for c in calls if c.name == self.student and _is_logits(c.output)]
        if not calls:
            where = f"{type(self._root).__name__}.{self.student}" if self.student else "the LightningModule's forward"
            raise SparseliteError(f"distillation saw no call of {where} that returned logits in this training step; "
                                  "set Distillation(student=...) to the submodule that computes them")
        with_grad = [c for c in calls if logits_of(c.output).requires_grad]
        return with_grad or calls

    def _choose_student(self, calls: Sequence[_Call]) -> str:
        names = list(dict.fromkeys(c.name for c in calls if _is_logits(c.output)))
        if "" in names:
            return ""
        if len(names) == 1:
            return names[0]
        if not names:
            raise SparseliteError("distillation saw no module return logits in training_step; set "
                                  "Distillation(student=...) to the submodule whose forward computes them")
        raise SparseliteError(f"training_step calls several submodules that return tensors ({', '.join(names)}); "
                              "set Distillation(student=...) to the one whose output is the logits")


def _is_logits(output: Any) -> bool:
    try:
        logits = logits_of(output)
    except SparseliteError:
        return False
    return logits.dim() >= 2 and logits.is_floating_point()


def _is_lightning_module(module: nn.Module) -> bool:
    return any(cls.__name__ == "LightningModule" for cls in type(module).__mro__)
