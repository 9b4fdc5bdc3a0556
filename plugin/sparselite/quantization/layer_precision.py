"""Which precision each weight layer gets: the precision names, their checks, and a mapping's resolution
to layers. Shared by training (``float_activations.py`` simulates them) and export (``export/precision.py``
writes them).

A precision is ``"int8"`` (the fully int8 file), ``"dynamic_int8"``, ``"fp16"``, ``"fp32"``, ``"auto"``
(chosen at export, ``export/auto_precision.py``), or a mapping from module-name regular expressions
(whole-name match) to ``"dynamic_int8"``, ``"fp16"`` or ``"fp32"``, with a ``"default"`` entry for the
layers no pattern names: ``{"default": "dynamic_int8", "features\\..*": "fp32"}``. The default may also
be ``"int8"``: the int8 file, whose float islands (the ops ``float_fallback`` keeps float where XNNPACK
has no int8 kernel) hold the layers the patterns name at their precision
(``{"default": "int8", "encoder\\..*attention": "dynamic_int8"}``: a transformer's attention, float
between its softmax and norms, dynamic-range; the rest int8). A named layer the file holds in int8
stays int8: between int8 neighbours, a float layer would only add conversions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Union

from torch import nn

from sparselite.errors import SparseliteError

PRECISIONS = ("int8", "dynamic_int8", "fp16", "fp32", "auto")
LAYER_PRECISIONS = ("dynamic_int8", "fp16", "fp32")  # what a layer of a mixed file can have
PrecisionSpec = Union[str, Mapping[str, str]]
DEFAULT_KEY = "default"


def check_precision(spec: PrecisionSpec) -> None:
    """Refuse, with one line, a value that is not a precision or a valid mapping (no model needed)."""
    if isinstance(spec, str):
        if spec not in PRECISIONS:
            raise SparseliteError(f"precision={spec!r} must be one of {', '.join(PRECISIONS)}, or a mapping "
                                  f"{{module regex: precision, 'default': precision}}")
        return
    if not isinstance(spec, Mapping) or not spec:
        raise SparseliteError(f"precision={spec!r} must be one of {', '.join(PRECISIONS)} or a non-empty mapping")
    for pattern, value in spec.items():
        if pattern == DEFAULT_KEY and value == "int8":
            continue
        if value not in LAYER_PRECISIONS:
            raise SparseliteError(f"precision[{pattern!r}]={value!r}: a layer's precision is one of "
                                  f"{', '.join(LAYER_PRECISIONS)} ('int8' is the int8 file: only the default can be it)")
        if pattern != DEFAULT_KEY:
            try:
                re.compile(pattern)
            except re.error as err:
                raise SparseliteError(f"precision pattern {pattern!r} is not a valid regular expression: {err}") from None


def is_int8_file(spec: PrecisionSpec | None) -> bool:
    """Whether ``spec`` makes the int8 file: ``"int8"`` (or None, resolved at export), or a mapping whose
    default is ``"int8"`` (its other layers float-activation in it)."""
    return spec in (None, "int8") or (isinstance(spec, Mapping) and spec.get(DEFAULT_KEY) == "int8")


def layer_precisions(model: nn.Module, spec: PrecisionSpec) -> dict[str, str]:
    """Each weight layer's precision (module name -> precision; "int8" for the layers of an int8 file's
    default). Refuses a pattern that names no layer and a precision a layer cannot have, naming them."""
    check_precision(spec)
    layers = weight_layers(model)
    rules = dict(spec) if isinstance(spec, Mapping) else {DEFAULT_KEY: spec}
    default = rules.pop(DEFAULT_KEY, "fp32")
    unmatched = [pattern for pattern in rules if not any(re.fullmatch(pattern, name) for name in layers)]
    if unmatched:
        raise SparseliteError(f"precision pattern(s) {unmatched} match no layer with weights; the layers are "
                              f"{', '.join(list(layers)[:8])}{' ...' if len(layers) > 8 else ''}")
    chosen = {}
    for name in layers:
        chosen[name] = next((value for pattern, value in reversed(rules.items()) if re.fullmatch(pattern, name)), default)
    depthwise = [name for name, module in layers.items()
                 if chosen[name] == "dynamic_int8" and is_depthwise(module)]
    if depthwise:
        raise SparseliteError(f"dynamic_int8 on depthwise conv(s) {', '.join(depthwise[:4])}: XNNPACK has no "
                              "dynamic-range depthwise kernel; give them 'fp32' or 'fp16' (a precision mapping), "
                              "or export the whole model as 'int8'")
    return chosen


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that hold a weight matrix or kernel of their own (Linear, convs, an RNN's ``weight_ih_l0``,
    attention's ``in_proj_weight``): the layers a precision applies to."""
    return {name: module for name, module in model.named_modules()
            if any("weight" in p_name and p.dim() >= 2 for p_name, p in module.named_parameters(recurse=False))}


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels
