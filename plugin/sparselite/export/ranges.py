"""Quantize a float model with litert's pt2e quantizer, using the activation ranges learned in QAT.

pt2e places observers on the aten graph; training placed fake-quant on modules. Each observer is
mapped to a training-side point by walking back through ops that keep their input's quantization
(activations fused into the producer, pooling, reshapes) to the conv/linear that produced the value,
or to the model input. Observers with no learned range keep the range calibrated on real batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
from torchao.quantization.pt2e.observer import MinMaxObserver, ObserverBase
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from sparselite.quantization.spec import ACT_QMAX, ACT_QMIN, SCALE_EPS

# Ops whose int8 output TFLite expresses in the input's scale (or that fuse into the op before them).
_SHARES_INPUT_RANGE = {
    "hardtanh", "hardtanh_", "relu", "relu_", "relu6", "clamp", "max_pool2d", "avg_pool2d",
    "adaptive_avg_pool2d", "mean", "flatten", "view", "reshape", "squeeze", "unsqueeze", "permute",
    "dropout", "identity", "contiguous", "_to_copy", "clone",
}
_PRODUCERS = {"conv2d", "linear", "convolution"}


@dataclass
class RangeInjection:
    learned: dict[str, str] = field(default_factory=dict)  # observer -> training point it took its range from
    calibrated: list[str] = field(default_factory=list)  # observers left with calibrated ranges


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _module_path(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0]


def source_point(node: torch.fx.Node, observers: Mapping[str, torch.nn.Module]) -> str | None:
    """The training-side quantization point behind a value: a producer's module path, '' for the input."""
    while True:
        if node.op == "placeholder":
            return ""
        if node.op == "call_module" and node.target in observers:
            node = node.args[0]
            continue
        if node.op == "call_function" and _op_name(node) in _SHARES_INPUT_RANGE:
            node = node.args[0]
            continue
        if node.op == "call_function" and _op_name(node) in _PRODUCERS:
            return _module_path(node)
        return None


def _fixed_range_observer(min_val: float, max_val: float) -> MinMaxObserver:
    observer = MinMaxObserver(dtype=torch.int8, qscheme=torch.per_tensor_affine,
                              quant_min=ACT_QMIN, quant_max=ACT_QMAX, eps=SCALE_EPS)
    observer.min_val.resize_(()).fill_(min_val)
    observer.max_val.resize_(()).fill_(max_val)
    return observer


def quantize_pt2e(float_model: torch.nn.Module, example_inputs: tuple, ranges: Mapping[str, tuple[float, float]],
                  calibration: Iterable[torch.Tensor] = ()) -> tuple[torch.fx.GraphModule, PT2EQuantizer, RangeInjection]:
    """torch.export -> prepare_pt2e -> forward passes -> learned ranges in -> convert_pt2e."""
    exported = torch.export.export(float_model, example_inputs).module()
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        # Weight observers only see the weights during a forward pass: skip it and every weight
        # scale stays 1.0, the model converts silently and scores at chance.
        prepared(*example_inputs)
        # The exported graph has the example's batch size, so calibration runs in slices of it.
        step = example_inputs[0].shape[0]
        for batch in calibration:
            for start in range(0, len(batch) - step + 1, step):
                prepared(batch[start : start + step])
    # Not named_children(): it de-duplicates, and pt2e registers one observer under several names
    # where ops share quantization (conv -> in-place relu). Every alias must get the learned range.
    observers = {name: m for name, m in prepared._modules.items() if isinstance(m, ObserverBase)}
    injection = RangeInjection()
    for node in prepared.graph.nodes:
        if node.op != "call_module" or node.target not in observers:
            continue
        observer = observers[node.target]
        if observer.qscheme != torch.per_tensor_affine:
            continue  # weights: per-channel, taken from the current weights, as in training
        point = source_point(node.args[0], observers)
        if point is not None and point in ranges:
            setattr(prepared, node.target, _fixed_range_observer(*ranges[point]))
            injection.learned[node.target] = point or "<input>"
        else:
            injection.calibrated.append(node.target)
    converted = convert_pt2e(prepared, fold_quantize=False)
    return converted, quantizer, injection
