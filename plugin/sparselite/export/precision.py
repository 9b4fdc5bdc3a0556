"""The precision of each layer in the exported file, and the flatbuffer pass that writes it.

- ``"int8"``: the fully int8 file (static activation ranges, learned in QAT): the whole file's form,
  written by the pt2e route (``conversion.convert_with_ranges``).
- ``"dynamic_int8"``: int8 weights per output channel, read directly by FULLY_CONNECTED and CONV_2D
  (a "hybrid" op); XNNPACK quantizes the float activations per row at run time (its qd8 kernels).
  XNNPACK has no such kernel for DEPTHWISE_CONV_2D, so a depthwise layer cannot have it.
- ``"fp16"``: fp16 weights behind a DEQUANTIZE (half the bytes; the GPU accelerator computes in fp16,
  XNNPACK on x86 unpacks them to fp32 at load).
- ``"fp32"``: float weights.
- ``"auto"``: chosen per layer from measured latency and accuracy (``auto_precision.py``).

A precision is one of these, or a per-layer mapping (``quantization/layer_precision.py`` resolves it).
The fp32 conversion (litert-torch) is the starting point of dynamic_int8, fp16 and fp32; the pass
replaces each layer's weight tensor. Ops without weights (LayerNorm, attention, activations) stay fp32.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from ai_edge_litert import schema_py_generated as schema
from torch import nn

from sparselite.quantization.dynamic_range import quantize_inputs_dynamically
from sparselite.quantization.layer_precision import (  # noqa: F401  (the precision names, re-exported here)
    DEFAULT_KEY, LAYER_PRECISIONS, PRECISIONS, PrecisionSpec, check_precision, is_depthwise as _is_depthwise,
    layer_precisions, weight_layers,
)
from sparselite.quantization.spec import quantize_weight, weight_scales
from sparselite.tflite.flatbuffer import append_tensor, builtin_code, operator_code_index

_DYNAMIC_OPS = (schema.BuiltinOperator.FULLY_CONNECTED, schema.BuiltinOperator.CONV_2D)
_WEIGHT_OPS = (*_DYNAMIC_OPS, schema.BuiltinOperator.DEPTHWISE_CONV_2D)


def layer_of(tensor_name: str, layers: Iterable[str]) -> str | None:
    """The weight layer a tensor belongs to (tensors named by ``names.use_module_names``): the first of the
    name's ';'-joined parts (the converter joins the producers of a fused tensor, ``norm1;;attn;``) that is
    a layer or lies below one (an RNN's gate weights below the GRU)."""
    ordered = sorted(layers, key=len, reverse=True)
    for part in tensor_name.split(";"):
        layer = next((name for name in ordered if part == name or part.startswith(name + ".")), None)
        if layer is not None:
            return layer
    return None


class LayerFinder:
    """The weight layer of a file's weight tensor: by its name (``layer_of``), else by its values (a
    constant the converter names after itself, ``arith.constant1``, such as a GRU's recurrent weights,
    shared by every time step)."""

    def __init__(self, float_model: nn.Module, layers: Iterable[str]) -> None:
        self.layers = list(layers)
        self.weights = [(name, parameter.detach().numpy()) for name in self.layers
                        for p_name, parameter in float_model.get_submodule(name).named_parameters(recurse=False)
                        if "weight" in p_name and parameter.dim() >= 2]

    def __call__(self, tensor_name: str, values: np.ndarray) -> str | None:
        layer = layer_of(tensor_name, self.layers)
        if layer is not None:
            return layer
        return next((name for name, weight in self.weights
                     if weight.shape == values.shape and np.array_equal(weight, values)), None)


def apply_precisions(model: schema.ModelT, precisions: Mapping[str, str], find_layer: LayerFinder) -> dict[str, str]:
    """Rewrite, in place, the float weight of each FULLY_CONNECTED, CONV_2D and DEPTHWISE_CONV_2D to its
    layer's precision (fp32 for a weight of no known layer). Returns {layer: precision written}, from the
    types its weight tensors have after the pass ('dynamic_int8/fp32' where they differ)."""
    subgraph = model.subgraphs[0]
    written: dict[str, set[str]] = {}
    dequantized: dict[int, int] = {}  # fp16 weight tensor -> the DEQUANTIZE output that replaces it
    layers: dict[int, str | None] = {}  # float weight tensor -> its layer
    operators = []
    for op in subgraph.operators:
        code = builtin_code(model, op)
        weight_index = int(op.inputs[1]) if code in _WEIGHT_OPS and len(op.inputs) > 1 else -1
        weight = subgraph.tensors[weight_index] if weight_index >= 0 else None
        if weight_index in dequantized:  # a weight several ops read (an RNN's, at every step), already fp16
            op.inputs = [dequantized[weight_index] if i == 1 else int(t) for i, t in enumerate(op.inputs)]
            operators.append(op)
            continue
        if weight is None or model.buffers[weight.buffer].data is None or weight.type not in (
                schema.TensorType.FLOAT32, schema.TensorType.INT8, schema.TensorType.FLOAT16):
            operators.append(op)
            continue
        is_float = weight.type == schema.TensorType.FLOAT32
        if is_float and weight_index not in layers:  # a weight read by many ops (an RNN's) is looked up once
            layers[weight_index] = find_layer(weight.name.decode(), _float_values(model, weight))
        layer = layers.get(weight_index) if is_float else None
        chosen = precisions.get(layer, "fp32")
        if is_float and chosen == "dynamic_int8" and code in _DYNAMIC_OPS:
            _to_int8_per_channel(model, weight)
        elif is_float and chosen == "fp16":
            dequantized[weight_index] = _to_fp16(model, weight_index, operators)
            inputs = [int(i) for i in op.inputs]
            inputs[1] = dequantized[weight_index]
            op.inputs = inputs
        if layer is not None:
            written.setdefault(layer, set()).add(_precision_name(subgraph.tensors[weight_index]))
        operators.append(op)
    subgraph.operators = operators
    _drop_unreferenced_buffers(model)
    return {layer: "/".join(sorted(kinds)) for layer, kinds in written.items()}


def _drop_unreferenced_buffers(model: schema.ModelT) -> None:
    """Empty the buffers no tensor reads any more (the float weights a layer's new weights replaced)."""
    referenced = {int(tensor.buffer) for graph in model.subgraphs for tensor in graph.tensors}
    referenced |= {int(entry.buffer) for entry in model.metadata or []}  # min_runtime_version and the like
    for index, buffer in enumerate(model.buffers):
        if index not in referenced:
            buffer.data = None


def _precision_name(tensor: schema.TensorT) -> str:
    return {schema.TensorType.INT8: "dynamic_int8", schema.TensorType.FLOAT16: "fp16"}.get(tensor.type, "fp32")


def _float_values(model: schema.ModelT, tensor: schema.TensorT) -> np.ndarray:
    data = np.asarray(model.buffers[tensor.buffer].data, dtype=np.uint8)
    return data.view(np.float32).reshape([int(d) for d in tensor.shape])


def _to_int8_per_channel(model: schema.ModelT, tensor: schema.TensorT) -> None:
    """Symmetric int8 per output channel (dim 0, as XNNPACK's dynamic kernels need), on the grid QAT
    trains weights on (``spec.weight_scales``)."""
    values = torch.from_numpy(_float_values(model, tensor).copy())
    buffer = schema.BufferT()
    buffer.data = quantize_weight(values).numpy().view(np.uint8).reshape(-1)
    model.buffers.append(buffer)  # a buffer of its own: the float one may be shared
    tensor.buffer = len(model.buffers) - 1
    quantization = schema.QuantizationParametersT()
    quantization.scale = weight_scales(values).numpy().astype(np.float32)
    quantization.zeroPoint = np.zeros(len(quantization.scale), dtype=np.int64)
    quantization.quantizedDimension = 0
    tensor.quantization, tensor.type = quantization, schema.TensorType.INT8


def _to_fp16(model: schema.ModelT, weight_index: int, operators: list) -> int:
    """The weight stored as fp16, and a DEQUANTIZE to a new fp32 tensor (appended to ``operators``);
    returns that tensor's index."""
    subgraph = model.subgraphs[0]
    tensor = subgraph.tensors[weight_index]
    halves = _float_values(model, tensor).astype(np.float16)
    buffer = schema.BufferT()
    buffer.data = halves.view(np.uint8).reshape(-1)
    model.buffers.append(buffer)
    tensor.buffer, tensor.type = len(model.buffers) - 1, schema.TensorType.FLOAT16
    output = append_tensor(model, [int(d) for d in tensor.shape], schema.TensorType.FLOAT32, tensor.name + b"_fp32")
    dequantize = schema.OperatorT()
    dequantize.opcodeIndex = operator_code_index(model, schema.BuiltinOperator.DEQUANTIZE)
    dequantize.inputs, dequantize.outputs = [weight_index], [output]
    operators.append(dequantize)
    return output


@torch.no_grad()
def precision_reference(float_model: nn.Module, precisions: Mapping[str, str]) -> nn.Module:
    """The float model computing what the file computes, given the precisions the pass wrote: each layer's
    weights as the file stores them (int8 per channel, or fp16), and the input of each dynamic-range
    layer rounded per row as XNNPACK rounds it at run time (``dynamic_range.py``; a GRU or LSTM step
    by step, ``recurrent_steps.py``). Changes ``float_model`` in place."""
    for name, chosen in precisions.items():
        module = float_model.get_submodule(name)
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            continue  # the pass leaves TRANSPOSE_CONV's weight fp32
        for parameter_name, parameter in module.named_parameters(recurse=False):
            if "weight" not in parameter_name or parameter.dim() < 2:
                continue
            if chosen == "dynamic_int8" and not _is_depthwise(module):
                scales = weight_scales(parameter).reshape(-1, *([1] * (parameter.dim() - 1)))
                parameter.copy_(quantize_weight(parameter).float() * scales)
            elif chosen == "fp16":
                parameter.copy_(parameter.half().float())
        if chosen == "dynamic_int8":
            quantize_inputs_dynamically(module)
    return float_model
