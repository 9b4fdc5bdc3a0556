"""Finding the teacher, freezing it, and telling whether a resumed run found the same one.

A teacher is given as
  - an ``nn.Module`` (a LightningModule too): used as it is, frozen in place;
  - a checkpoint path: read with ``weights_only`` (``sparselite.checkpoints``: tensors only, a file with
    pickled code is refused before anything runs). Under ``sparselite fit`` the CLI layer gives the
    callback ``rebuild_run`` (``lightning_cli.restore_run``), so a checkpoint with its run's config.yaml
    is rebuilt from it, as ``sparselite export`` does; otherwise (a Trainer in a script, or no run
    config) the weights are loaded into a float copy of the student, so they must fit its architecture;
  - ``"initial"``: a frozen float copy of the student as it is when fit starts (fine-tuning from
    pretrained weights).

The teacher runs on every batch, so what runs is ``inference_form(teacher)``: a copy that computes the same
logits in less time. The teacher itself (its fingerprint, the state DDP broadcasts, a user's module) is
never changed beyond ``freeze``.

The teacher never becomes a submodule of the student: QAT's prepare, channel pruning, ``.train()``,
DDP and the student's checkpoint never see it. A run's checkpoint keeps only where the teacher came
from and its fingerprint (a hash of its weights), so a resumed run refuses a teacher that changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from sparselite.checkpoints import COMPRESSION_STATE, load_model_weights
from sparselite.errors import SparseliteError
from sparselite.module_copy import detached_copy
from sparselite.quantization.fusion import find_fused_chains, fold_batchnorm
from sparselite.quantization.qat import strip_fake_quant

INITIAL = "initial"
# checkpoint path -> the run's model rebuilt from its config, or None where it has none (set by the CLI layer).
RunRebuilder = Callable[[Path], "nn.Module | None"]


def check_teacher_argument(teacher: object) -> str:
    """Validate ``teacher`` as given (no file access: a recipe is parsed again by ``sparselite export``,
    long after the teacher file may be gone). Returns a short description of the source."""
    if isinstance(teacher, nn.Module):
        return f"module {type(teacher).__name__}"
    if isinstance(teacher, (str, os.PathLike)) and str(teacher).strip():
        return INITIAL if str(teacher) == INITIAL else str(teacher)
    raise SparseliteError(f"teacher={teacher!r} must be an nn.Module, a checkpoint path, or 'initial' "
                          "(a frozen copy of the model as fit starts)")


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm uses, and never updates, its running statistics) and no gradients (none kept
    from the teacher's own training either: they would only hold memory)."""
    module.eval()
    module.requires_grad_(False)
    for parameter in module.parameters():
        parameter.grad = None
    return module


def inference_form(teacher: nn.Module) -> nn.Module:
    """A frozen copy of ``teacher`` that computes the same outputs (to float rounding) faster:
      - each BatchNorm folded into the conv or linear it follows (the chains QAT folds; a model torch.fx
        cannot trace keeps its norms, and is still right);
      - on CPU, 4-D weights in channels-last order, oneDNN's native layout for convolutions (not on other
        devices: there it was not measured).
    On the demo model (batch 128, one thread) the forward takes 27 ms instead of 50. Build it once the
    teacher is on its device."""
    copy = detached_copy(teacher).eval()
    with torch.no_grad():
        fold_batchnorm(copy, find_fused_chains(copy))
    on_cpu = all(p.device.type == "cpu" for p in copy.parameters())
    return freeze(copy.to(memory_format=torch.channels_last) if on_cpu else copy)


def fingerprint(module: nn.Module) -> str:
    """sha256 of the module's float weights and buffers (names, shapes, dtypes, values); compression
    state (``sparselite_*``) is left out, so a teacher that was pruned or quantized when saved still matches."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if COMPRESSION_STATE in name or not isinstance(tensor, torch.Tensor):
            continue
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


def float_snapshot(student: nn.Module) -> nn.Module:
    """A float copy of ``student`` as it is now (without its Trainer, without compression state), frozen."""
    copy = detached_copy(student)
    without_compression_state(copy)  # the other callbacks' setup may have run before this one's
    return freeze(copy)


def without_compression_state(module: nn.Module) -> nn.Module:
    """Strip what sparselite's training callbacks attach: QAT's fake-quant, and the pruners' mask buffers and
    state-dict hooks (masks are all ones at setup; the teacher never applies them, and keeps every channel)."""
    strip_fake_quant(module)
    for submodule in module.modules():
        for name in [n for n in submodule._buffers if n.startswith(COMPRESSION_STATE)]:
            del submodule._buffers[name]
        for hooks in (submodule._state_dict_hooks, submodule._state_dict_pre_hooks,
                      submodule._load_state_dict_pre_hooks, submodule._load_state_dict_post_hooks):
            for key, hook in list(hooks.items()):
                function = getattr(hook, "hook", hook)  # load pre-hooks come wrapped
                function = getattr(function, "func", function)  # functools.partial
                if getattr(function, "__module__", "").startswith("sparselite."):
                    del hooks[key]
    return module


def resolve_teacher(teacher: nn.Module | str | os.PathLike, student: nn.Module,
                    rebuild_run: RunRebuilder | None = None) -> nn.Module:
    """The teacher module, frozen. ``student`` is the model being trained (for ``"initial"`` and for a
    checkpoint that ``rebuild_run`` does not rebuild)."""
    check_teacher_argument(teacher)
    if isinstance(teacher, nn.Module):
        if teacher is student:
            raise SparseliteError("teacher is the model being trained; pass teacher='initial' for a frozen copy of it "
                                  "as fit starts")
        student_parameters = {id(p) for p in student.parameters()}
        if any(id(p) in student_parameters for p in teacher.parameters()):
            raise SparseliteError("the teacher shares parameters with the model being trained (is it one of its "
                                  "submodules?); pass a separate module, or teacher='initial' for a frozen copy")
        return freeze(teacher)
    if str(teacher) == INITIAL:
        return float_snapshot(student)
    return freeze(load_teacher_checkpoint(Path(teacher), student, rebuild_run))


def load_teacher_checkpoint(path: Path, student: nn.Module, rebuild_run: RunRebuilder | None = None) -> nn.Module:
    """The model a checkpoint holds, read as tensors only; fake-quant stripped (the teacher stays float)."""
    from sparselite.checkpoints import load_checkpoint

    if not path.is_file():
        raise SparseliteError(f"teacher checkpoint {path} does not exist; train the teacher first (e.g. "
                              "`sparselite fit -c <config> -c recipes/dense.yaml`) or fix the path")
    loaded = load_checkpoint(path)  # refuses pickled code before anything else reads the file
    module = None
    if rebuild_run is not None:
        with _global_state_untouched():
            module = rebuild_run(path)
    if module is None:
        module = _load_into_copy(loaded["state_dict"], student, path)
    return without_compression_state(module)


def _load_into_copy(state_dict: dict, student: nn.Module, path: Path) -> nn.Module:
    """A checkpoint with no run config: its weights in a float copy of the student's architecture."""
    module = float_snapshot(student)
    try:
        load_model_weights(module, state_dict, f"teacher checkpoint {path}")
    except SparseliteError as err:
        raise SparseliteError(f"{err}, and has no config.yaml next to it to rebuild its own; pass the teacher as a "
                              "module, or a checkpoint written by `sparselite fit`") from None
    return module


@contextlib.contextmanager
def _global_state_untouched() -> Iterator[None]:
    """Rebuilding the teacher's run parses its config, whose ``seed_everything`` would reseed every RNG in the
    middle of the student's fit (and Lightning logs it): keep the student's random streams and log quiet."""
    import numpy as np

    environment = {key: os.environ.get(key) for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    python_state, numpy_state = random.getstate(), np.random.get_state()
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        for key, value in environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
