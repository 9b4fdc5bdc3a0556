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
export's float copy. The branches' BatchNorms fold with their running statistics, so fine-tuning from
trained weights loses nothing; training from scratch trains the deploy form, without the branches and their
norms, and the callbacks say so when such a fit starts (``warn_if_untrained``).
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

log = logging.getLogger("sparselite")

DEPLOY_METHODS = ("reparameterize", "switch_to_deploy")
_SWITCHED = "_sparselite_deploy_form"  # on the root: the names of the blocks switched
_UNTRAINED = "_sparselite_deploy_form_untrained"  # ... and of those whose norms had never run


def to_deploy_form(model: nn.Module) -> list[str]:
    """Switch every block under ``model`` that offers its deploy form; returns the blocks switched. A second
    call (another callback, the export) changes nothing and returns the first call's list."""
    if _SWITCHED in model.__dict__:
        return list(model.__dict__[_SWITCHED])
    switched: list[str] = []
    untrained: list[str] = []
    with torch.no_grad():
        _switch_children(model, "", switched, untrained)
    model.__dict__[_SWITCHED] = tuple(switched)  # a plain attribute: copies keep it, state_dicts do not hold it
    model.__dict__[_UNTRAINED] = tuple(untrained)
    return switched


def warn_if_untrained(model: nn.Module) -> None:
    """Once per model: say so when the blocks were switched before their norms ever ran. Callbacks call it
    for a fit that starts from the model as built (not for one that resumes: its checkpoint holds trained
    deploy-form weights, and the fresh model's norms are untrained by construction)."""
    untrained = model.__dict__.pop(_UNTRAINED, ())
    if untrained:
        log.warning("reparameterizable blocks switched to their deploy form before their BatchNorms ever ran (%s%s): "
                    "the deploy form trains without its branches and norms; for the multi-branch form's accuracy, "
                    "train the dense model first and compress from its checkpoint",
                    ", ".join(untrained[:3]), f" and {len(untrained) - 3} more" if len(untrained) > 3 else "")


def deploy_form_blocks(model: nn.Module) -> list[str]:
    """The blocks ``to_deploy_form`` switched in ``model`` (or in the model it was copied from)."""
    return list(model.__dict__.get(_SWITCHED, ()))


def _switch_children(module: nn.Module, prefix: str, switched: list[str], untrained: list[str]) -> None:
    for name, child in list(module.named_children()):
        method = _deploy_method(child)
        if method is not None:
            before = _structure(child)
            fresh = _has_untrained_norm(child)
            method()
            if _structure(child) != before:
                switched.append(prefix + name)
                untrained += [prefix + name] if fresh else []
        _switch_children(child, f"{prefix}{name}.", switched, untrained)  # nested blocks (a FastViT stage's mixers)


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
