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
trained weights loses nothing; training from scratch trains the deploy form, without the branches.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

DEPLOY_METHODS = ("reparameterize", "switch_to_deploy")
_SWITCHED = "_sparselite_deploy_form"  # on the root: the names of the blocks switched


def to_deploy_form(model: nn.Module) -> list[str]:
    """Switch every block under ``model`` that offers its deploy form; returns the blocks switched. A second
    call (another callback, the export) changes nothing and returns the first call's list."""
    if _SWITCHED in model.__dict__:
        return list(model.__dict__[_SWITCHED])
    switched: list[str] = []
    with torch.no_grad():
        _switch_children(model, "", switched)
    model.__dict__[_SWITCHED] = tuple(switched)  # a plain attribute: copies keep it, state_dicts do not hold it
    return switched


def deploy_form_blocks(model: nn.Module) -> list[str]:
    """The blocks ``to_deploy_form`` switched in ``model`` (or in the model it was copied from)."""
    return list(model.__dict__.get(_SWITCHED, ()))


def _switch_children(module: nn.Module, prefix: str, switched: list[str]) -> None:
    for name, child in list(module.named_children()):
        method = _deploy_method(child)
        if method is not None:
            before = _structure(child)
            method()
            if _structure(child) != before:
                switched.append(prefix + name)
        _switch_children(child, f"{prefix}{name}.", switched)  # nested blocks (a FastViT stage's mixers)


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
