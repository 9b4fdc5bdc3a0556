"""Model I/O dtype: the converter emits int8 inputs and outputs; most apps want float32.

Adds a QUANTIZE op in front of each int8 input and a DEQUANTIZE op after each int8 output, the same
ops TFLite's converter inserts for float I/O. Signature defs keep pointing at the model's I/O.

An image input's first op is the TRANSPOSE from torch's NCHW to NHWC. With a few channels innermost,
XNNPACK transposes float faster than int8, so that input is transposed first and quantized after
(the same integers). Timed alone (QUANTIZE and TRANSPOSE, 1 thread), int8-then-float over
float-then-int8: 3 channels 0.62x at 64x64 and 0.65x at 224x224, 4 channels 0.84x / 0.90x; from 8
channels on it is slower (1.05x at 224x224, 2.3-3.7x at 64 channels), and 1 channel needs no transpose.
"""

from __future__ import annotations

import copy

from ai_edge_litert import schema_py_generated as schema

from sparselite.tflite.flatbuffer import append_tensor, builtin_code, operator_code_index


def _float_twin(model: schema.ModelT, tensor: schema.TensorT, suffix: str) -> int:
    """A float32 tensor with the same shape, appended to the subgraph; returns its index."""
    index = append_tensor(model, tensor.shape, schema.TensorType.FLOAT32, (tensor.name or b"") + suffix.encode())
    model.subgraphs[0].tensors[index].shapeSignature = copy.copy(tensor.shapeSignature)
    return index


# Up to this many channels innermost, the input is transposed in float (see the module docstring).
_TRANSPOSE_IN_FLOAT_MAX_CHANNELS = 4


def _layout_transpose(model: schema.ModelT, tensor: int) -> schema.OperatorT | None:
    """The TRANSPOSE that is the only reader of ``tensor``, when its output has few channels innermost."""
    subgraph = model.subgraphs[0]
    readers = [op for op in subgraph.operators if op.inputs is not None and tensor in [int(i) for i in op.inputs]]
    if len(readers) != 1 or builtin_code(model, readers[0]) != schema.BuiltinOperator.TRANSPOSE:
        return None
    transpose = readers[0]
    output = subgraph.tensors[int(transpose.outputs[0])]
    if int(transpose.inputs[0]) != tensor or int(transpose.outputs[0]) in [int(o) for o in subgraph.outputs]:
        return None
    return transpose if len(output.shape) and int(output.shape[-1]) <= _TRANSPOSE_IN_FLOAT_MAX_CHANNELS else None


def use_float_io(model: schema.ModelT) -> schema.ModelT:
    """Give every int8 input and output of the main subgraph a float32 interface, in place."""
    subgraph = model.subgraphs[0]
    quantize = operator_code_index(model, schema.BuiltinOperator.QUANTIZE)
    dequantize = operator_code_index(model, schema.BuiltinOperator.DEQUANTIZE)
    subgraph.inputs, subgraph.outputs = list(subgraph.inputs), list(subgraph.outputs)
    remap: dict[int, int] = {}
    new_head, new_tail = [], []
    for ends, opcode, added, is_input in ((subgraph.inputs, quantize, new_head, True),
                                          (subgraph.outputs, dequantize, new_tail, False)):
        for position, index in enumerate(ends):
            if subgraph.tensors[index].type != schema.TensorType.INT8:
                continue
            twin = _float_twin(model, subgraph.tensors[index], "_float")
            op = schema.OperatorT()
            op.opcodeIndex = opcode
            op.inputs, op.outputs = ([twin], [index]) if is_input else ([index], [twin])
            transpose = _layout_transpose(model, index) if is_input else None
            if transpose is not None:  # twin -> TRANSPOSE -> QUANTIZE -> what the transpose wrote
                transposed = int(transpose.outputs[0])
                float_transposed = _float_twin(model, subgraph.tensors[transposed], "_float")
                transpose.inputs = [twin, *list(transpose.inputs)[1:]]
                transpose.outputs = [float_transposed]
                op.inputs, op.outputs = [float_transposed], [transposed]
                subgraph.operators.remove(transpose)
                added.append(transpose)
            added.append(op)
            ends[position] = remap[index] = twin
    subgraph.operators = new_head + list(subgraph.operators) + new_tail
    for signature in model.signatureDefs or []:
        for entry in list(signature.inputs or []) + list(signature.outputs or []):
            entry.tensorIndex = remap.get(entry.tensorIndex, entry.tensorIndex)
    return model
