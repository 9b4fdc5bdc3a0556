"""Which layers get pruned: module types, name patterns, and the latency-aware XNNPACK policy.

What is selected is a weight (``targets.PruningTarget``): a Conv/Linear layer's, named after its module,
or each gate matrix of a GRU/LSTM/RNN, named ``<module>.<parameter>`` (``rnn.weight_hh_l0``); patterns
match either name, so ``rnn`` addresses all of a recurrent layer's matrices and ``rnn\\.weight_hh_l0`` one.

Skipped by default, and why:
  - depthwise convolutions: a 3x3 depthwise kernel has 9 weights per channel; removing them costs much
    accuracy and saves few bytes;
  - weights with fewer than ``min_params`` values (the stem conv, tiny heads): the same trade.
Recurrent cells (``nn.GRUCell``, ``nn.LSTMCell``) are not pruned: a model steps them in its own Python
loop, and how the converter writes their weights (one constant, or one per step) has not been checked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

from torch import nn

from sparselite.errors import SparseliteError
from sparselite.pruning.targets import PruningTarget, layer_targets

# Recurrent layers count: the converter writes their gate matrices as FULLY_CONNECTED weights (fp32 or
# dynamic-range int8 files; a float island in fully int8 ones), so their zeros reach the file whatever its
# precision, and for a GRU/LSTM model they are most of the weights.
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.RNNBase)
Policy = Literal["all", "xnnpack_latency"]  # 'xnnpack_latency': only the 1x1 convs XNNPACK's sparse kernels run


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups > 1 and module.groups == module.in_channels


def is_pointwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.groups == 1
    )


def _compile(patterns: Iterable[str], what: str) -> tuple[re.Pattern, ...]:
    compiled = []
    for text in patterns:
        try:
            compiled.append(re.compile(text))
        except re.error as err:
            raise SparseliteError(f"{what} pattern '{text}' is not a valid regular expression: {err}") from None
    return tuple(compiled)


def match_names(patterns: Sequence[re.Pattern], names: Iterable[str]) -> dict[str, list[str]]:
    names = list(names)
    return {p.pattern: [n for n in names if p.fullmatch(n)] for p in patterns}


@dataclass(frozen=True)
class LayerSelection:
    """Which layers to prune. Validated at construction: bad regexes and policies fail before training.

    ``include``/``exclude`` are regular expressions matched against whole module names, or a recurrent
    weight's name (``re.fullmatch``); an explicit include overrides the default skips (depthwise,
    ``min_params``). A pattern that matches no module is an error at ``select``, since it is almost
    always a typo that would silently leave a layer dense.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_depthwise: bool = True
    min_params: int = 1024
    policy: Policy = "all"
    module_types: tuple[type[nn.Module], ...] = DEFAULT_TYPES
    _includes: tuple[re.Pattern, ...] = field(init=False, repr=False, compare=False)
    _excludes: tuple[re.Pattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Accept lists and None from YAML and keyword callers; store tuples so the value stays frozen.
        for name in ("include", "exclude", "module_types"):
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))
        if self.policy not in get_args(Policy):
            raise SparseliteError(f"unknown layer policy '{self.policy}'; use 'all' or 'xnnpack_latency'")
        if self.min_params < 0:
            raise SparseliteError(f"min_params={self.min_params} must be >= 0")
        object.__setattr__(self, "_includes", _compile(self.include, "include"))
        object.__setattr__(self, "_excludes", _compile(self.exclude, "exclude"))

    def select(self, model: nn.Module) -> dict[str, PruningTarget]:
        """Weights to prune, by target name (a Conv/Linear layer's module name, ``<rnn>.<weight_ih_l0>``)."""
        named = {name: m for name, m in model.named_modules() if name}
        includes, excludes = self._includes, self._excludes
        addressable = list(named) + [t.name for name, m in named.items() if isinstance(m, nn.RNNBase)
                                     for t in layer_targets(name, m)]
        for kind, hits in (("include", match_names(includes, addressable)),
                           ("exclude", match_names(excludes, addressable))):
            for pattern, matched in hits.items():
                if not matched:
                    raise SparseliteError(
                        f"{kind} pattern '{pattern}' matches no module; names look like: {', '.join(list(named)[:6])}"
                    )

        if self.policy == "xnnpack_latency":
            check_xnnpack_sparse_graph(model)

        selected, skipped = {}, {}
        for name, module in named.items():
            if isinstance(module, nn.RNNCellBase):
                skipped[name] = f"{type(module).__name__}: recurrent cells are not pruned"
                continue
            if not isinstance(module, self.module_types):
                continue
            if not isinstance(module, nn.RNNBase) and getattr(module, "weight", None) is None:
                continue
            for target in layer_targets(name, module):
                why = self._skip_reason(target, includes, excludes)
                if why:
                    skipped[target.name] = why
                else:
                    selected[target.name] = target
        if not selected:
            seen = "; ".join(f"{name}: {why}" for name, why in list(skipped.items())[:6])
            more = f" (+{len(skipped) - 6} more)" if len(skipped) > 6 else ""
            types = ", ".join(t.__name__ for t in self.module_types)
            raise SparseliteError(
                f"no layer was selected for pruning; layers of types {types} seen and skipped: {seen or 'none'}{more}"
            )
        return selected

    def _skip_reason(self, target: PruningTarget, includes: Sequence[re.Pattern],
                     excludes: Sequence[re.Pattern]) -> str | None:
        module, count = target.module, target.weight.numel()
        explicitly_included = any(target.matched_by(p) for p in includes)
        if includes and not explicitly_included:
            return "not matched by include"
        if any(target.matched_by(p) for p in excludes):
            return "matched by exclude"
        if self.policy == "xnnpack_latency" and not is_pointwise(module):
            return "not a 1x1 conv (policy xnnpack_latency)"  # XNNPACK's SpMM exists only for 1x1 convs
        if not explicitly_included and self.skip_depthwise and is_depthwise(module):
            return "depthwise (skip_depthwise)"
        if not explicitly_included and count < self.min_params:
            return f"{count} weights < min_params={self.min_params}"
        return None


def check_xnnpack_sparse_graph(model: nn.Module) -> None:
    """The graph shape XNNPACK's sparse (NCHW) path needs, as tfmot's PruneForLatencyOnXNNPack checks it:
    a 3x3 stride-2 stem conv over 3 channels (its HWC->CHW kernel exists only for that), then only
    1x1 convs, depthwise convs and element-wise ops, ending in global average pooling."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise SparseliteError("policy 'xnnpack_latency' needs a convolutional model; it found no Conv2d")
    stem_name, stem = convs[0]
    if stem.kernel_size != (3, 3) or stem.stride != (2, 2) or stem.in_channels != 3 or stem.groups != 1:
        raise SparseliteError(
            f"policy 'xnnpack_latency': the first conv '{stem_name}' must be 3x3, stride 2, over 3 input "
            f"channels for XNNPACK's sparse path (it is {stem.kernel_size}, stride {stem.stride}, "
            f"{stem.in_channels} channels); use policy 'all'"
        )
    for name, conv in convs[1:]:
        if not (is_pointwise(conv) or is_depthwise(conv)):
            raise SparseliteError(
                f"policy 'xnnpack_latency': conv '{name}' is neither 1x1 nor depthwise, so XNNPACK would leave "
                "the sparse NCHW path there; use policy 'all'"
            )
    if not any(isinstance(m, (nn.AdaptiveAvgPool2d)) for m in model.modules()):
        raise SparseliteError(
            "policy 'xnnpack_latency': the conv trunk must end in global average pooling (nn.AdaptiveAvgPool2d)"
        )
