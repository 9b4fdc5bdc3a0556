"""Reparameterizable blocks switched to their deploy form before pruning, QAT or the export see the model.

RepVGG, MobileOne, FastViT, RepGhost and their kin train a block as several branches (a kxk conv, a 1x1
conv, an identity BatchNorm) and run it as the one conv those branches add up to. The block offers the
switch as a method with no arguments: ``reparameterize()`` (timm) or ``switch_to_deploy()`` (the original
RepVGG and MobileOne code). sparselite calls it, as the libraries' own "reparameterize the model" helpers
do, so that:

- pruning prunes the conv the file holds (masks on the branches would not survive their sum);
- QAT fake-quantizes that conv, so the fake-quant model computes what the int8 file computes;
- the file runs one conv per block instead of three and their additions.

Blocks are found by that method, never by a class or model name, and only a call that changed the block
counts (a method that does nothing, like a ghost module without re-parameterizable branches, is no switch).
The switch happens once per model, when the first sparselite callback prepares it (before a checkpoint's
state_dict loads, so a resumed run matches its checkpoint) or, for a model trained without them, on the
export's float copy. The branches' BatchNorms fold with their running statistics, so the switch is made only
for a block whose norms have run (trained or pretrained weights: fine-tuning loses nothing). A block whose
norms never ran (a model from scratch) keeps its training form, branches and norms, through training and
into the file: its deploy form would train without normalization, and a RepVGG-style net from scratch then
does not train at all (repvgg_a0: chance accuracy at 100 steps). The callbacks say so when such a fit starts
(``warn_if_kept``), and the report lists both kinds.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

log = logging.getLogger("sparselite")

DEPLOY_METHODS = ("reparameterize", "switch_to_deploy")
_SWITCHED = "_sparselite_deploy_form"  # on the root: the names of the blocks switched
_KEPT = "_sparselite_training_form"  # ... and of those kept in their training form (norms that never ran)
_WARN = "_sparselite_training_form_warning"  # the kept blocks, until a callback has said so once


def to_deploy_form(model: nn.Module) -> list[str]:
    """Switch every block under ``model`` that offers its deploy form and whose norms have run; returns the
    blocks switched. Decided once per model: a second call (another callback, the export) changes nothing
    and returns the first call's list, so training, its checkpoints and its file hold one form."""
    if _SWITCHED in model.__dict__:
        return list(model.__dict__[_SWITCHED])
    switched: list[str] = []
    kept: list[str] = []
    with torch.no_grad():
        _switch_children(model, "", switched, kept)
    # Plain attributes: copies keep them, state_dicts do not hold them.
    model.__dict__[_SWITCHED], model.__dict__[_KEPT], model.__dict__[_WARN] = tuple(switched), tuple(kept), tuple(kept)
    return switched


def warn_if_kept(model: nn.Module) -> None:
    """Once per model: say which blocks keep their training form, and how to get the deploy form. Callbacks
    call it for a fit that starts from the model as built, not for one that resumes."""
    kept = model.__dict__.pop(_WARN, ())
    if kept:
        log.warning("%d reparameterizable blocks keep their training form (every branch, in training and in the "
                    "file): their BatchNorms never ran (%s), and their deploy form would train without "
                    "normalization; train the dense model first and compress from its checkpoint to get one conv "
                    "per block", len(kept), _listed(kept))


def deploy_form_blocks(model: nn.Module) -> list[str]:
    """The blocks ``to_deploy_form`` switched in ``model`` (or in the model it was copied from)."""
    return list(model.__dict__.get(_SWITCHED, ()))


def training_form_blocks(model: nn.Module) -> list[str]:
    """The blocks ``to_deploy_form`` left in their training form: their norms had never run."""
    return list(model.__dict__.get(_KEPT, ()))


def _listed(names: tuple[str, ...] | list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _switch_children(module: nn.Module, prefix: str, switched: list[str], kept: list[str]) -> None:
    for name, child in list(module.named_children()):
        method = _deploy_method(child)
        if method is not None and _has_untrained_norm(child):
            kept.append(prefix + name)
            continue  # and its nested blocks with it
        if method is not None:
            before = _structure(child)
            method()
            if _structure(child) != before:
                switched.append(prefix + name)
        _switch_children(child, f"{prefix}{name}.", switched, kept)  # nested blocks (a FastViT stage's mixers)


def _has_untrained_norm(module: nn.Module) -> bool:
    """A BatchNorm that never saw a training batch: its running statistics are still exactly 0 and 1 (a model
    from scratch). Not its batch count: pretrained weights often come without one, and load as 0."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
               and bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all()) for m in module.modules())


def _deploy_method(module: nn.Module):
    for name in DEPLOY_METHODS:
        method = getattr(module, name, None)
        if callable(method) and _takes_no_arguments(method):
            return method
    return None


def _takes_no_arguments(method) -> bool:
    """``reparameterize(self)``, not, say, a VAE's ``reparameterize(mu, logvar)``."""
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters)


def _structure(module: nn.Module) -> tuple:
    """What a switch changes: which submodules and parameters the block holds."""
    return tuple((name, id(sub)) for name, sub in module.named_modules()) + \
        tuple((name, id(p)) for name, p in module.named_parameters())
