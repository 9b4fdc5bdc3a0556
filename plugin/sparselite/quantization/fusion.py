"""Find what TFLite fuses: conv/linear -> [BatchNorm] -> [activation], and fold BN for export.

TFLite quantizes the output of the fused op, i.e. after the activation. Training must put its
activation fake-quant in the same place, or its ranges span values the int8 model never holds.

A BatchNorm2d that follows no conv (DenseNet's and pre-activation ResNets' BN -> ReLU -> conv) has
nothing to fold into: export writes it as what it computes in eval mode, a depthwise 1x1 conv (its
scale per channel the weight, its shift the bias), which runs in int8 and fuses its activation. So
it heads a chain of its own.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

PRODUCER_TYPES = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)
ACTIVATION_TYPES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_BATCHNORM_OF = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d,
                 nn.ConvTranspose1d: nn.BatchNorm1d, nn.ConvTranspose2d: nn.BatchNorm2d}


@dataclass(frozen=True)
class FusedChain:
    producer: str  # the conv or linear whose (post-BN, post-activation) output is one int8 tensor
    batchnorm: str | None
    activation: str | None

    @property
    def output_module(self) -> str:
        return self.activation or self.batchnorm or self.producer


def find_fused_chains(model: nn.Module) -> list[FusedChain]:
    """Every conv/linear with the BN and activation modules that follow it alone.

    Uses torch.fx symbolic tracing; a model it cannot trace gets chains of one module each, which
    is still correct, just with ranges taken before the activation.
    """
    modules = dict(model.named_modules())
    producers = [name for name, m in modules.items() if _is_producer(m)]
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:
        return [FusedChain(name, None, None) for name in producers]

    def sole_module_user(node: torch.fx.Node, types: tuple[type, ...]) -> torch.fx.Node | None:
        users = [u for u in node.users if not (u.op == "call_function" and u.target is operator.getitem)]
        if len(node.users) != 1 or len(users) != 1:
            return None
        user = users[0]
        if user.op == "call_module" and isinstance(modules.get(user.target), types):
            return user
        return None

    # A module called more than once (ResNet's one ReLU, after the conv and after the add) cannot
    # end a chain: a hook on it would give every call the chain's range.
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in producers:
            continue
        if calls[node.target] > 1:  # a shared conv/linear: one chain of its own, whatever follows each call
            if all(c.producer != node.target for c in chains):
                chains.append(FusedChain(node.target, None, None))
            continue
        batchnorm = activation = None
        tail = node
        bn_type = next((bn for conv, bn in _BATCHNORM_OF.items() if isinstance(modules[node.target], conv)), None)
        if bn_type and (bn := sole_module_user(tail, (bn_type,))) and calls[bn.target] == 1:
            batchnorm, tail = bn.target, bn
        if (act := sole_module_user(tail, ACTIVATION_TYPES)) and calls[act.target] == 1:
            activation = act.target
        chains.append(FusedChain(node.target, batchnorm, activation))
    folded = {c.batchnorm for c in chains}
    for node in graph.nodes:
        if node.op == "call_module" and _is_foldable_batchnorm(modules[node.target]) and node.target not in folded \
                and calls[node.target] == 1:
            act = sole_module_user(node, ACTIVATION_TYPES)
            chains.append(FusedChain(node.target, None, act.target if act is not None and calls[act.target] == 1 else None))
    return chains


def _is_producer(module: nn.Module) -> bool:
    """A conv or linear whose BN folds per output channel. Not a grouped transposed conv: its weight is
    [in, out / groups, k...], which torch's fold (and TFLite's per-channel scales) cannot index by output
    channel; a BN after it stays a BN of its own (a depthwise 1x1 conv in the file)."""
    if not isinstance(module, PRODUCER_TYPES):
        return False
    return not isinstance(module, nn.modules.conv._ConvTransposeNd) or module.groups == 1


def _is_foldable_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm2d with running statistics (without, it normalizes each batch in eval mode too)."""
    return type(module) is nn.BatchNorm2d and module.running_var is not None


@torch.no_grad()
def batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(gain, shift) per channel: what an eval-mode BN computes, ``x * gain + shift``."""
    gain = torch.rsqrt(bn.running_var + bn.eps) * (bn.weight.detach() if bn.affine else 1.0)
    return gain, (bn.bias.detach() if bn.affine else 0.0) - bn.running_mean * gain


def batchnorm_as_depthwise(model: nn.Module) -> nn.Module:
    """Replace, in place, every BatchNorm2d left after ``fold_batchnorm`` with the depthwise 1x1 conv
    that computes the same in eval mode. Model must be in eval()."""
    for name, bn in list(model.named_modules()):
        if not _is_foldable_batchnorm(bn):
            continue
        gain, shift = batchnorm_affine(bn)
        conv = nn.Conv2d(bn.num_features, bn.num_features, 1, groups=bn.num_features).to(bn.running_var.device)
        with torch.no_grad():
            conv.weight.copy_(gain.reshape(-1, 1, 1, 1))
            conv.bias.copy_(shift)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, conv.eval())
    return model


def fold_batchnorm(model: nn.Module, chains: list[FusedChain]) -> nn.Module:
    """Fold each chain's BN into its conv, in place, and replace the BN with Identity. Model must be in eval()."""
    for chain in chains:
        if chain.batchnorm is None:
            continue
        conv = model.get_submodule(chain.producer)
        bn = model.get_submodule(chain.batchnorm)
        fused = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.modules.conv._ConvTransposeNd))
        conv.weight, conv.bias = fused.weight, fused.bias
        parent_name, _, child = chain.batchnorm.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
    return model
