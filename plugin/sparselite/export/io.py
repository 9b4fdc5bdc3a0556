"""Model I/O dtype: the converter emits int8 inputs and outputs; most apps want float32.

Adds a QUANTIZE op in front of each int8 input and a DEQUANTIZE op after each int8 output, the same
ops TFLite's converter inserts for float I/O. Signature defs keep pointing at the model's I/O.
"""

from __future__ import annotations

import copy

from ai_edge_litert import schema_py_generated as schema

from sparselite.tflite.flatbuffer import operator_code_index


def _float_twin(model: schema.ModelT, tensor: schema.TensorT, suffix: str) -> int:
    """A float32 tensor with the same shape, appended to the subgraph; returns its index."""
    subgraph = model.subgraphs[0]
    twin = schema.TensorT()
    twin.shape = list(tensor.shape)
    twin.shapeSignature = copy.copy(tensor.shapeSignature)
    twin.type = schema.TensorType.FLOAT32
    twin.name = (tensor.name or b"") + suffix.encode()
    empty = schema.BufferT()
    model.buffers.append(empty)
    twin.buffer = len(model.buffers) - 1
    subgraph.tensors.append(twin)
    return len(subgraph.tensors) - 1


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
            added.append(op)
            ends[position] = remap[index] = twin
    subgraph.operators = new_head + list(subgraph.operators) + new_tail
    for signature in model.signatureDefs or []:
        for entry in list(signature.inputs or []) + list(signature.outputs or []):
            entry.tensorIndex = remap.get(entry.tensorIndex, entry.tensorIndex)
    return model
