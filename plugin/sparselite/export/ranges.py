"""Quantize a float model with the full-int8 pt2e quantizer, using the activation ranges learned in QAT.

pt2e places observers on the aten graph; training placed fake-quant on modules and call sites. Each
observer is mapped to a training-side point by walking back through ops that keep their input's
quantization (fused activations, pooling, reshapes) to the value's origin:
  - the model input ('');
  - a conv/linear (its fused chain's output range);
  - a module whose output training observed (Hardswish, SiLU, ...: the last op inside it);
  - a functional op's call site (``sparselite_op_quant.block/add_0``), numbered as in training.
An add/sub/mul of a constant takes its range from its input's by interval arithmetic (the inside of
a decomposed hardsigmoid). Fixed-range ops (LOGISTIC, SOFTMAX, TANH) keep the range their int8
kernels require. Everything else keeps the range calibrated on real batches, with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torchao.quantization.pt2e.observer import FixedQParamsObserver, MinMaxObserver, ObserverBase
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from sparselite.export.lowering import op_kind
from sparselite.export.quantizer import CONCATENATION, SHARES_INPUT_RANGE, SPLITS, FullInt8Quantizer
from sparselite.quantization.functional_ops import ATEN_KINDS, site_name
from sparselite.quantization.spec import ACT_QMAX, ACT_QMIN, SCALE_EPS

_PRODUCERS = {"conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d", "linear", "convolution"}


@dataclass
class RangeInjection:
    learned: dict[str, str] = field(default_factory=dict)  # observer -> training point it took its range from
    derived: dict[str, str] = field(default_factory=dict)  # observer -> how its range follows from a learned one
    fixed: list[str] = field(default_factory=list)  # observers whose range the int8 kernel fixes
    calibrated: dict[str, str] = field(default_factory=dict)  # observer -> why no learned range applies
    # Of those, the ones whose value comes from an op the quantizer leaves float (Mish, GroupNorm): the
    # op kind and module, which the strict export refuses whatever the calibration.
    float_sources: dict[str, tuple[str, str]] = field(default_factory=dict)


def module_path(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0]


def _module_call(node: torch.fx.Node) -> str | None:
    """The module *invocation* a node belongs to (torch.export keys a second call 'relu@1')."""
    stack = node.meta.get("nn_module_stack")
    return list(stack)[-1] if stack else None


def op_sites(graph: torch.fx.Graph) -> dict[torch.fx.Node, str]:
    """Functional-op nodes -> the call-site names training gave them (see ``quantization/functional_ops.py``)."""
    counts: dict[tuple[str, str], int] = {}
    sites = {}
    for node in graph.nodes:
        kind = ATEN_KINDS.get(op_kind(node))
        value = node.meta.get("val")
        if kind is None or node.meta.get("sparselite_decomposed") or not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            continue
        owner = module_path(node) or ""
        index = counts.get((owner, kind), 0)
        counts[(owner, kind)] = index + 1
        sites[node] = site_name(owner, kind, index)
    return sites


class PointResolver:
    """Maps a graph value to the training point whose range it must carry."""

    def __init__(self, graph: torch.fx.Graph, observers: Mapping[str, torch.nn.Module], ranges: Mapping[str, tuple[float, float]]) -> None:
        self.observers, self.ranges = observers, ranges
        self.sites = op_sites(graph)

    def source(self, node: torch.fx.Node) -> torch.fx.Node:
        """Walk back through observers and ops that keep their input's quantization."""
        while True:
            if node.op == "call_module" and node.target in self.observers:
                node = node.args[0]
            elif node.op == "call_function" and op_kind(node) in SHARES_INPUT_RANGE:
                node = node.args[0]
            elif _piece_of_input(node):
                node = node.args[0].args[0]
            elif (common := self._pieces_of_one_value(node)) is not None:
                node = common
            else:
                return node

    def _pieces_of_one_value(self, node: torch.fx.Node) -> torch.fx.Node | None:
        """The one value that a concatenation export wrote (a decomposed adaptive pooling) puts back
        together from slices and means of it; None for anything else. A concatenation in the user's
        code has a range of its own, learned at its call site."""
        if op_kind(node) not in CONCATENATION or not node.meta.get("sparselite_decomposed"):
            return None
        sources = {self.source(part) for part in node.args[0]}
        return sources.pop() if len(sources) == 1 else None

    def point(self, node: torch.fx.Node) -> str | None:
        """The training point of the value ``node`` computes, or None."""
        node = self.source(node)
        if node.op == "placeholder":
            return ""
        if node.op != "call_function":
            return None
        if op_kind(node) in _PRODUCERS:
            return module_path(node)
        if node in self.sites and self.sites[node] in self.ranges:
            return self.sites[node]
        if op_kind(node) in CONCATENATION and (joined := self._one_grid_concatenation(node)) is not None:
            return joined
        owner = module_path(node)
        leaves_module = all(_module_call(user) != _module_call(node) for user in self._consumers(node))
        if owner and owner in self.ranges and leaves_module:
            return owner
        return None

    def _one_grid_concatenation(self, node: torch.fx.Node) -> str | None:
        """A concatenation training did not round, whose parts all carry one learned range: the slices
        of channels that a BN folded into their convs reads (``fusion.FusedChain.channels``). It joins
        values already on that grid, so it keeps it."""
        parts = node.args[0] if node.args and isinstance(node.args[0], (list, tuple)) else []
        points = [self.point(part) for part in parts if isinstance(part, torch.fx.Node)]
        if len(points) < 2 or len(points) != len(parts) or any(p is None or p not in self.ranges for p in points):
            return None
        return points[0] if len({self.ranges[p] for p in points}) == 1 else None

    def _consumers(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        """The ops that read ``node``'s value, looking through the observers pt2e put between them."""
        consumers = []
        for user in node.users:
            if user.op == "call_module" and user.target in self.observers:
                consumers.extend(self._consumers(user))
            else:
                consumers.append(user)
        return consumers

    def derived_range(self, node: torch.fx.Node) -> tuple[tuple[float, float], str] | None:
        """The range of a value computed from learned ones by ops with constant operands (the inside of
        a decomposed hardsigmoid or hardswish): interval arithmetic through add/sub/mul and clamps."""
        found = self._interval(node, depth=0)
        return None if found is None else found

    def _interval(self, node: torch.fx.Node, depth: int) -> tuple[tuple[float, float], str] | None:
        if depth > 8:
            return None
        while node.op == "call_module" and node.target in self.observers:
            node = node.args[0]
        kind = op_kind(node)
        if kind in ("hardtanh", "clamp", "relu", "relu6"):
            inner = self._interval(node.args[0], depth + 1)
            if inner is None:
                return None
            low, high = (0.0, float("inf")) if kind.startswith("relu") else _clamp_bounds(node)
            (lo, hi), how = inner
            return (min(max(lo, low), high), max(min(hi, high), low)), f"clamp({how})"
        if kind in SHARES_INPUT_RANGE or _piece_of_input(node):
            return self._interval(node.args[0] if kind != "getitem" else node.args[0].args[0], depth + 1)
        point = self.point(node)
        if point is not None and point in self.ranges:
            return self.ranges[point], point or "<input>"
        if kind not in ("add", "sub", "mul") or len(node.args) != 2:
            return None
        variable, constant = node.args
        value = _constant(constant, node.graph)
        if value is None:
            return None
        inner = self._interval(variable, depth + 1)
        if inner is None:
            return None
        (lo, hi), how = inner
        if kind == "add":
            lo, hi = lo + value, hi + value
        elif kind == "sub":
            lo, hi = lo - value, hi - value
        else:
            lo, hi = sorted((lo * value, hi * value))
        return (lo, hi), f"{how} {kind} {value:g}"


def _piece_of_input(node: torch.fx.Node) -> bool:
    """A piece of a split, or the values (not the indices) of a max pooling or a max over a dim: on
    the grid of the op's input."""
    return op_kind(node) == "getitem" and (op_kind(node.args[0]) in SPLITS or op_kind(node.args[0]) in SHARES_INPUT_RANGE)


def _clamp_bounds(node: torch.fx.Node) -> tuple[float, float]:
    if op_kind(node).startswith("hardtanh"):
        low = node.args[1] if len(node.args) > 1 else -1.0
        high = node.args[2] if len(node.args) > 2 else 1.0
    else:
        low = node.args[1] if len(node.args) > 1 and node.args[1] is not None else float("-inf")
        high = node.args[2] if len(node.args) > 2 and node.args[2] is not None else float("inf")
    return float(low), float(high)


def _constant(arg: object, graph: torch.fx.Graph) -> float | None:
    if isinstance(arg, (int, float)):
        return float(arg)
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        value = getattr(graph.owning_module, arg.target, None)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return float(value)
    return None


def _fixed_range_read(node: torch.fx.Node, observers: Mapping[str, torch.nn.Module]) -> tuple[float, float] | None:
    """The range of a fixed-range observer that this observer reads: pt2e gives a conv's input an
    observer of its own after a TANH, whose fixed grid litert's conv annotation does not share."""
    observer = observers.get(node.target) if node.op == "call_module" else None
    if not isinstance(observer, FixedQParamsObserver):
        return None
    scale, zero_point = float(observer.scale), int(observer.zero_point)
    return (ACT_QMIN - zero_point) * scale, (ACT_QMAX - zero_point) * scale


def _fixed_range_observer(min_val: float, max_val: float) -> MinMaxObserver:
    observer = MinMaxObserver(dtype=torch.int8, qscheme=torch.per_tensor_affine,
                              quant_min=ACT_QMIN, quant_max=ACT_QMAX, eps=SCALE_EPS)
    observer.min_val.resize_(()).fill_(min_val)
    observer.max_val.resize_(()).fill_(max_val)
    return observer


def _quantized_output(node: torch.fx.Node) -> bool:
    """Whether the quantizer annotated the op's output for int8 (pt2e's annotation on the node)."""
    annotation = node.meta.get("quantization_annotation")
    return annotation is not None and getattr(annotation, "output_qspec", None) is not None


def _describe(source: torch.fx.Node) -> str:
    """Why an observed value has no QAT range, for the report."""
    where = f"'{module_path(source) or '?'}'"
    if decomposed := source.meta.get("sparselite_decomposed"):
        return f"{op_kind(source)} inside the int8 form of {decomposed} in {where}, not simulated in training"
    return f"no QAT point for {op_kind(source) or source.op} in {where}"


def quantize_pt2e(float_model: torch.nn.Module, example_inputs: tuple, ranges: Mapping[str, tuple[float, float]],
                  calibration: Iterable[torch.Tensor] = (), float_modules: frozenset[str] = frozenset(),
                  ) -> tuple[torch.fx.GraphModule, FullInt8Quantizer, RangeInjection]:
    """torch.export -> prepare_pt2e -> forward passes -> learned ranges in -> convert_pt2e (the own ops
    of ``float_modules`` stay float)."""
    exported = torch.export.export(float_model, example_inputs).module()
    quantizer = FullInt8Quantizer(float_modules)
    prepared = prepare_pt2e(exported, quantizer)
    # Not named_children(): it de-duplicates, and pt2e registers one observer under several names
    # where ops share quantization (conv -> in-place relu). Every alias must get the learned range.
    observers = {name: m for name, m in prepared._modules.items() if isinstance(m, ObserverBase)}
    resolver = PointResolver(prepared.graph, observers, ranges)
    injection = RangeInjection()
    replacements = {}
    for node in prepared.graph.nodes:
        if node.op != "call_module" or node.target not in observers:
            continue
        observer = observers[node.target]
        if isinstance(observer, FixedQParamsObserver):
            injection.fixed.append(node.target)
            continue
        if observer.qscheme != torch.per_tensor_affine:
            continue  # weights: per-channel, taken from the current weights, as in training
        point = resolver.point(node.args[0])
        if node.args[0].op == "get_attr":
            injection.derived[node.target] = "a constant operand: its range is its value's"
        elif (fixed := _fixed_range_read(node.args[0], observers)) is not None:
            replacements[node.target] = fixed
            injection.derived[node.target] = "reads a fixed-range output (TANH, LOGISTIC) on its grid"
        elif point is not None and point in ranges:
            replacements[node.target] = ranges[point]
            injection.learned[node.target] = point or "<input>"
        elif ranges and (derived := resolver.derived_range(node.args[0])) is not None:
            replacements[node.target], injection.derived[node.target] = derived
        else:
            source = resolver.source(node.args[0])
            injection.calibrated[node.target] = "the model has no QAT ranges" if not ranges else _describe(source)
            if source.op == "call_function" and not _quantized_output(source):
                injection.float_sources[node.target] = (op_kind(source) or str(source.target), module_path(source) or "")
    with torch.no_grad():
        # Weight observers only see the weights during a forward pass: skip it and every weight
        # scale stays 1.0, the model converts silently and scores at chance.
        prepared(*example_inputs)
        if injection.calibrated:  # calibration is slow (histogram observers); only when a range needs it
            # The exported graph has the example's batch size, so calibration runs in slices of it.
            step = example_inputs[0].shape[0]
            for batch in calibration:
                for start in range(0, len(batch) - step + 1, step):
                    prepared(batch[start : start + step])
    for name, (lo, hi) in replacements.items():
        setattr(prepared, name, _fixed_range_observer(lo, hi))
    converted = convert_pt2e(prepared, fold_quantize=False)
    return converted, quantizer, injection
