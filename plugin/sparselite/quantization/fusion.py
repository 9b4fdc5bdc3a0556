"""Find what TFLite fuses: conv/linear -> [BatchNorm] -> [activation], and fold BN for export.

TFLite quantizes the output of the fused op, i.e. after the activation. Training must put its
activation fake-quant in the same place, or its ranges span values the int8 model never holds.

A BatchNorm2d that follows no conv (DenseNet's and pre-activation ResNets' BN -> ReLU -> conv) has
nothing to fold into: export writes it as what it computes in eval mode, a depthwise 1x1 conv (its
scale per channel the weight, its shift the bias), which runs in int8 and fuses its activation. So
it heads a chain of its own.

Model libraries fuse the norm and the activation into one module (timm's ``BatchNormAct2d``: a
BatchNorm2d subclass whose forward runs the norm, then its ``drop`` and ``act`` children). Such a
module is recognized by what it computes (``norm_activation``), never by its class: a BatchNorm2d
subclass whose eval-mode output is its running-statistics norm passed through its children in turn,
of which at most one is not an identity in eval mode (the activation). Its norm folds like a plain
BatchNorm2d's; its activation stays, under its own name, and ends the chain as a standalone one would.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
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
    # The chain's output is this module's *input*: the activation inside a norm+activation module,
    # which TFLite does not fuse (Hardswish, SiLU): the norm's output is requantized before it.
    output_before: str | None = None
    # The BN's channels [start, end) that fold into this producer: the BN follows a concatenation of
    # several producers' outputs (MixNet's mixed-kernel convs), and each takes its slice of it. The
    # producers of one concatenation share one output range, the BN's (after its activation).
    channels: tuple[int, int] | None = None

    @property
    def output_module(self) -> str:
        return self.activation or self.batchnorm or self.producer


@dataclass(frozen=True)
class NormActivation:
    """What a BatchNorm2d (or a subclass that runs more after its norm) computes in eval mode: its
    running-statistics norm, then ``activation`` (a child's name), or nothing more."""

    activation: str | None


_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def norm_activation(module: nn.Module) -> NormActivation | None:
    """For a BatchNorm2d with running statistics (without, it normalizes each batch in eval mode too):
    the norm, then at most one activation child. None for any other module, and for a subclass whose
    forward computes something else (it is then left to torch's tracing, op by op, as any module
    sparselite does not know)."""
    if not isinstance(module, nn.BatchNorm2d) or module.running_var is None:
        return None
    if type(module) is nn.BatchNorm2d:
        return NormActivation(None)
    if module not in _PROBED:
        _PROBED[module] = _probe_norm_activation(module)
    return _PROBED[module]


@torch.no_grad()
def _probe_norm_activation(bn: nn.BatchNorm2d) -> NormActivation | None:
    """Run ``bn`` once in eval mode on a probe and check that its output is the norm, passed through the
    children it calls, each once, each reading what the one before returned."""
    calls: list[list] = []  # [name, input, output], in call order (copies: activations run in place)
    handles = []
    for name, child in bn.named_children():
        handles.append(child.register_forward_pre_hook(
            lambda _m, args, name=name: calls.append([name, args[0].clone() if args else None, None])))
        handles.append(child.register_forward_hook(
            lambda _m, _args, output, name=name: calls[-1].__setitem__(2, output.clone()) if calls and calls[-1][0] == name else None))
    probe = _probe_input(bn)
    was_training = bn.training
    try:
        bn.eval()
        output = bn(probe.clone())
    except Exception:  # noqa: BLE001 - a forward that cannot run on a plain 4-D tensor is not a norm
        return None
    finally:
        bn.train(was_training)
        for handle in handles:
            handle.remove()
    value = F.batch_norm(probe, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    names = [name for name, _, _ in calls]
    if len(set(names)) != len(names) or not isinstance(output, torch.Tensor):
        return None
    for _, given, returned in calls:
        if given is None or returned is None or given.shape != value.shape or not torch.allclose(given, value, rtol=1e-4, atol=1e-5):
            return None
        value = returned
    if output.shape != value.shape or not torch.allclose(output, value, rtol=1e-4, atol=1e-5):
        return None
    acting = [name for name in names if not _identity_in_eval(bn.get_submodule(name), probe)]
    return NormActivation(acting[0]) if len(acting) == 1 else NormActivation(None) if not acting else None


def _probe_input(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Values that reach well below and above every channel's mean, so an activation cannot pass as an
    identity."""
    spread = torch.linspace(-4.0, 4.0, 18, dtype=bn.running_var.dtype, device=bn.running_var.device).reshape(2, 1, 3, 3)
    return bn.running_mean.reshape(1, -1, 1, 1) + spread * torch.sqrt(bn.running_var + bn.eps).reshape(1, -1, 1, 1)


def _identity_in_eval(module: nn.Module, probe: torch.Tensor) -> bool:
    was_training = module.training
    try:
        module.eval()
        return bool(torch.equal(module(probe.clone()), probe))
    finally:
        module.train(was_training)


class _NormFoldedTracer(torch.fx.Tracer):
    """torch.fx's default tracer, which also keeps the norm+activation modules and the conv/linear
    subclasses whole (one call_module node each), so the chains see them where torch's own would be.
    (The norms are probed before tracing: fx patches ``Module.__call__`` while it traces.)"""

    def __init__(self, norms: set[nn.Module]) -> None:
        super().__init__()
        self.norms = norms

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # A library's conv or linear subclass (timm's Linear) is a producer like torch's own.
        return m in self.norms or isinstance(m, PRODUCER_TYPES) or super().is_leaf_module(m, module_qualified_name)


class ActivationAfterFold(nn.Module):
    """What is left of a norm+activation module once its norm is folded away: its activation, under the
    name it had (ranges and reports name it ``<norm>.<activation>``)."""

    def __init__(self, name: str, activation: nn.Module) -> None:
        super().__init__()
        self.name = name
        self.add_module(name, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._modules[self.name](x)


def find_fused_chains(model: nn.Module) -> list[FusedChain]:
    """Every conv/linear with the BN and activation modules that follow it alone.

    Uses torch.fx symbolic tracing (``_traced_graphs``): where a module cannot be traced as a whole, its
    children are, so the chains inside them are still found. A producer in no traced graph gets a chain
    of its own, which is still correct, just with ranges taken before the activation.
    """
    modules = dict(model.named_modules())
    producers = [name for name, m in modules.items() if _is_producer(m)]
    graphs = _traced_graphs(model, _NormFoldedTracer({m for m in modules.values() if norm_activation(m) is not None}))
    nodes = [node for graph in graphs for node in graph.nodes]

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
    for node in nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    chains = []
    sliced = _concatenations_into_a_norm(nodes, modules, calls, sole_module_user)
    for node in nodes:
        if node.op != "call_module" or node.target not in producers:
            continue
        if node.target in sliced:
            chains.append(sliced[node.target])
            continue
        if calls[node.target] > 1:  # a shared conv/linear: one chain of its own, whatever follows each call
            if all(c.producer != node.target for c in chains):
                chains.append(FusedChain(node.target, None, None))
            continue
        chains.append(_chain_from(node, modules, calls, sole_module_user))
    chained = {c.producer for c in chains}
    chains += [FusedChain(name, None, None) for name in producers if name not in chained]  # in no traced graph
    folded = {c.batchnorm for c in chains}
    for node in nodes:
        if node.op != "call_module" or node.target in folded or calls[node.target] != 1:
            continue
        norm = norm_activation(modules[node.target])
        if norm is None:
            continue
        if norm.activation is not None:  # a norm+activation module after no conv (after a concatenation)
            chains.append(_norm_chain(node.target, norm, modules))
            continue
        act = sole_module_user(node, ACTIVATION_TYPES)
        chains.append(FusedChain(node.target, None, act.target if act is not None and calls[act.target] == 1 else None))
    chains += [_norm_chain(name, norm, modules) for name, module in modules.items()  # norms in no traced graph
               if name not in calls and (norm := norm_activation(module)) is not None]
    return chains


def _norm_chain(name: str, norm: NormActivation, modules: dict[str, nn.Module]) -> FusedChain:
    """The chain a norm (+activation) module after no conv heads: it ends at the module's activation
    where TFLite fuses that, else the norm's output is requantized before the activation."""
    if norm.activation is None:
        return FusedChain(name, None, None)
    inner = f"{name}.{norm.activation}"
    fused = isinstance(modules[inner], ACTIVATION_TYPES)
    return FusedChain(name, None, inner if fused else None, output_before=None if fused else inner)


def _traced_graphs(module: nn.Module, tracer: torch.fx.Tracer, prefix: str = "") -> list[torch.fx.Graph]:
    """fx graphs that cover ``module``: its own, or where its forward cannot be traced (control flow on
    a shape, as in attention blocks that fold patches), those of its children, recursively. Module
    targets are qualified from the model's root. A chain across a child's border is not found; a chain
    inside one sees every use of its tensors (a child that returns a conv's output gives it a second user)."""
    try:
        graph = tracer.trace(module)
    except Exception:
        return [g for name, child in module.named_children() for g in _traced_graphs(child, tracer, f"{prefix}{name}.")]
    for node in graph.nodes:
        if node.op == "call_module":
            node.target = prefix + node.target
    return [graph]


def _chain_from(node: torch.fx.Node, modules: dict[str, nn.Module], calls: dict[str, int], sole_module_user) -> FusedChain:
    """The chain a conv/linear node heads: its BN (plain, or a norm+activation module) and activation."""
    bn_type = next((bn for conv, bn in _BATCHNORM_OF.items() if isinstance(modules[node.target], conv)), None)
    if bn_type and (bn := sole_module_user(node, (bn_type,))) and calls[bn.target] == 1:
        norm = norm_activation(modules[bn.target]) if bn_type is nn.BatchNorm2d else NormActivation(None)
        if norm is not None:
            return FusedChain(node.target, bn.target, *_after_norm(bn, norm, modules, calls, sole_module_user))
    act = sole_module_user(node, ACTIVATION_TYPES)
    return FusedChain(node.target, None, act.target if act is not None and calls[act.target] == 1 else None)


def _after_norm(bn: torch.fx.Node, norm: NormActivation, modules: dict[str, nn.Module], calls: dict[str, int],
                sole_module_user) -> tuple[str | None, str | None]:
    """(activation, output_before) of a chain through the norm ``bn``: the activation inside a
    norm+activation module, or the one module after the norm."""
    if norm.activation is not None:  # the activation is inside the norm's module
        inner = f"{bn.target}.{norm.activation}"
        return (inner, None) if isinstance(modules[inner], ACTIVATION_TYPES) else (None, inner)
    act = sole_module_user(bn, ACTIVATION_TYPES)
    return (act.target if act is not None and calls[act.target] == 1 else None), None


def _concatenations_into_a_norm(nodes: list[torch.fx.Node], modules: dict[str, nn.Module], calls: dict[str, int],
                                sole_module_user) -> dict[str, FusedChain]:
    """Producer -> its chain, for the producers concatenated along channels into a BatchNorm2d that
    reads nothing else: ``bn(cat([conv_a(x_a), conv_b(x_b)], 1))``. The BN folds into each conv's slice
    of channels, and the concatenation of the folded outputs is the BN's output, as a float sum is,
    exactly. Each producer must be a Conv2d called once whose one reader is the concatenation."""
    found: dict[str, FusedChain] = {}
    for node in nodes:
        if node.op != "call_function" or node.target is not torch.cat or not node.args:
            continue
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        parts = node.args[0]
        norm_node = sole_module_user(node, (nn.BatchNorm2d,))
        if dim not in (1, -3) or not isinstance(parts, (list, tuple)) or len(parts) < 2 or norm_node is None:
            continue
        norm = norm_activation(modules[norm_node.target])
        if norm is None or calls[norm_node.target] != 1:
            continue
        if not all(isinstance(p, torch.fx.Node) and p.op == "call_module" and isinstance(modules.get(p.target), nn.Conv2d)
                   and calls[p.target] == 1 and list(p.users) == [node] for p in parts):
            continue
        widths = [modules[p.target].out_channels for p in parts]
        if sum(widths) != modules[norm_node.target].num_features:
            continue
        activation, output_before = _after_norm(norm_node, norm, modules, calls, sole_module_user)
        start = 0
        for part, width in zip(parts, widths):
            found[part.target] = FusedChain(part.target, norm_node.target, activation, output_before, (start, start + width))
            start += width
    return found


def _is_producer(module: nn.Module) -> bool:
    """A conv or linear whose BN folds per output channel. Not a grouped transposed conv: its weight is
    [in, out / groups, k...], which torch's fold (and TFLite's per-channel scales) cannot index by output
    channel; a BN after it stays a BN of its own (a depthwise 1x1 conv in the file)."""
    if not isinstance(module, PRODUCER_TYPES):
        return False
    return not isinstance(module, nn.modules.conv._ConvTransposeNd) or module.groups == 1


@torch.no_grad()
def batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(gain, shift) per channel: what an eval-mode BN computes, ``x * gain + shift``."""
    gain = torch.rsqrt(bn.running_var + bn.eps) * (bn.weight.detach() if bn.affine else 1.0)
    return gain, (bn.bias.detach() if bn.affine else 0.0) - bn.running_mean * gain


class DepthwiseThenActivation(nn.Conv2d):
    """A norm+activation module that follows no conv, once its norm is the depthwise 1x1 conv it computes
    in eval mode: that conv, then the activation, under the name it had."""

    def __init__(self, channels: int, name: str, activation: nn.Module) -> None:
        super().__init__(channels, channels, 1, groups=channels)
        self.name = name
        self.add_module(name, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._modules[self.name](super().forward(x))


def batchnorm_as_depthwise(model: nn.Module) -> nn.Module:
    """Replace, in place, every BatchNorm2d left after ``fold_batchnorm`` with the depthwise 1x1 conv
    that computes the same in eval mode (and a norm+activation module's activation after it). Model must
    be in eval()."""
    for name, bn in list(model.named_modules()):
        norm = norm_activation(bn)
        if norm is None:
            continue
        gain, shift = batchnorm_affine(bn)
        if norm.activation is None:
            conv = nn.Conv2d(bn.num_features, bn.num_features, 1, groups=bn.num_features)
        else:
            conv = DepthwiseThenActivation(bn.num_features, norm.activation, bn.get_submodule(norm.activation))
        conv = conv.to(bn.running_var.device)
        with torch.no_grad():
            conv.weight.copy_(gain.reshape(-1, 1, 1, 1))
            conv.bias.copy_(shift)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, conv.eval())
    return model


class BatchNormSlice:
    """Channels [start, end) of a BatchNorm, read live (training moves its statistics): what folds into
    one producer of a concatenation the BN follows. It offers what folding reads of a BN."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, channels: tuple[int, int]) -> None:
        self.bn, self.channels = bn, channels

    def _slice(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor[self.channels[0]:self.channels[1]]

    running_mean = property(lambda self: self._slice(self.bn.running_mean))
    running_var = property(lambda self: self._slice(self.bn.running_var))
    weight = property(lambda self: self._slice(self.bn.weight))
    bias = property(lambda self: self._slice(self.bn.bias))
    eps = property(lambda self: self.bn.eps)
    affine = property(lambda self: self.bn.affine)
    training = property(lambda self: self.bn.training)


def chain_batchnorm(model: nn.Module, chain: FusedChain) -> nn.modules.batchnorm._BatchNorm | BatchNormSlice | None:
    """What of its BN folds into the chain's producer: the BN, its slice of channels, or None."""
    if chain.batchnorm is None:
        return None
    bn = model.get_submodule(chain.batchnorm)
    return bn if chain.channels is None else BatchNormSlice(bn, chain.channels)


def fold_batchnorm(model: nn.Module, chains: list[FusedChain]) -> nn.Module:
    """Fold each chain's BN (or its slice of it) into its conv, in place, and replace the BN with Identity
    (or the activation inside it). Model must be in eval()."""
    folding = [(chain, chain_batchnorm(model, chain)) for chain in chains if chain.batchnorm is not None]
    for chain, bn in folding:
        conv = model.get_submodule(chain.producer)
        fused = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.modules.conv._ConvTransposeNd))
        conv.weight, conv.bias = fused.weight, fused.bias
    moved: dict[str, str] = {}  # activation -> its norm, for the activations that move onto each slice's conv
    for chain, _ in folding:  # each slice's conv clamps its own output (a fused activation), the concatenation after
        if chain.channels is not None and chain.activation is not None:
            _activation_after(model.get_submodule(chain.producer), model.get_submodule(chain.activation))
            moved[chain.activation] = chain.batchnorm
    for chain in {chain.batchnorm: chain for chain, _ in folding}.values():
        inside = next((p for p in (chain.activation, chain.output_before) if p and p.startswith(f"{chain.batchnorm}.")), None)
        left = nn.Identity() if inside is None or inside in moved else ActivationAfterFold(inside.rpartition(".")[2], model.get_submodule(inside))
        _replace(model, chain.batchnorm, left)
    for activation, norm in moved.items():
        if not activation.startswith(f"{norm}."):  # a module of its own after the norm (one inside went with it)
            _replace(model, activation, nn.Identity())
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


ACTIVATION_AFTER_FOLD = "sparselite_activation"


def _activation_after(conv: nn.Module, activation: nn.Module) -> None:
    """Make ``conv`` apply ``activation`` to its output (an elementwise clamp TFLite fuses into it): the
    concatenation of the slices is then the activation's output, as the BN's activation computed it, and
    no int8 RELU of its own follows the concatenation (XNNPACK delegates none: it split mixnet_s's graph).
    A forward hook, which torch.export traces, keeps the conv's class and path."""
    conv.add_module(ACTIVATION_AFTER_FOLD, activation)
    conv.register_forward_hook(_apply_activation_after_fold)


def _apply_activation_after_fold(conv: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return conv._modules[ACTIVATION_AFTER_FOLD](output)
