"""Which layers get pruned: module types, name patterns, and the latency-aware XNNPACK policy.

Skipped by default, and why:
  - depthwise convolutions: a 3x3 depthwise kernel has 9 weights per channel; removing them costs much
    accuracy and saves few bytes;
  - layers with fewer than ``min_params`` weights (the stem conv, tiny heads): the same trade.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

from torch import nn

from sparselite.errors import SparseliteError

# Recurrent layers (GRU/LSTM) are not pruned: their cells export as float islands, whose weights
# litert-torch writes as float constants that no sparse encoding reaches, so masks would buy nothing.
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)
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

    ``include``/``exclude`` are regular expressions matched against whole module names
    (``re.fullmatch``); an explicit include overrides the default skips (depthwise, ``min_params``).
    A pattern that matches no module is an error at ``select``, since it is almost always a typo
    that would silently leave a layer dense.
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

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        """Layers to prune, by name."""
        named = {name: m for name, m in model.named_modules() if name}
        includes, excludes = self._includes, self._excludes
        for kind, hits in (("include", match_names(includes, named)), ("exclude", match_names(excludes, named))):
            for pattern, matched in hits.items():
                if not matched:
                    raise SparseliteError(
                        f"{kind} pattern '{pattern}' matches no module; names look like: {', '.join(list(named)[:6])}"
                    )

        if self.policy == "xnnpack_latency":
            check_xnnpack_sparse_graph(model)

        selected, skipped = {}, {}
        for name, module in named.items():
            explicitly_included = any(p.fullmatch(name) for p in includes)
            if not isinstance(module, self.module_types) or getattr(module, "weight", None) is None:
                if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
                    skipped[name] = f"{type(module).__name__}: recurrent layers are not pruned"
                continue
            if includes and not explicitly_included:
                skipped[name] = "not matched by include"
            elif any(p.fullmatch(name) for p in excludes):
                skipped[name] = "matched by exclude"
            elif self.policy == "xnnpack_latency" and not is_pointwise(module):
                skipped[name] = "not a 1x1 conv (policy xnnpack_latency)"  # XNNPACK's SpMM exists only for 1x1 convs
            elif not explicitly_included and self.skip_depthwise and is_depthwise(module):
                skipped[name] = "depthwise (skip_depthwise)"
            elif not explicitly_included and module.weight.numel() < self.min_params:
                skipped[name] = f"{module.weight.numel()} weights < min_params={self.min_params}"
            else:
                selected[name] = module
        if not selected:
            seen = "; ".join(f"{name}: {why}" for name, why in list(skipped.items())[:6])
            more = f" (+{len(skipped) - 6} more)" if len(skipped) > 6 else ""
            types = ", ".join(t.__name__ for t in self.module_types)
            raise SparseliteError(
                f"no layer was selected for pruning; layers of types {types} seen and skipped: {seen or 'none'}{more}"
            )
        return selected


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
