"""The op list of a model: what each operator is, in graph order (for reports that name ops)."""

from __future__ import annotations

from dataclasses import dataclass

from ai_edge_litert import schema_py_generated as schema

from sparselite.tflite.flatbuffer import WEIGHT_INPUT, builtin_code, builtin_name, tensor_name, tensor_type_name

# Ops between a stored weight and the op that reads it: the weight's stored type is what counts. (A RESHAPE
# to the same shape keeps a large-kernel depthwise conv off XNNPACK: export/xnnpack_forms.py.)
_UNPACKING = (schema.BuiltinOperator.DEQUANTIZE, schema.BuiltinOperator.DENSIFY, schema.BuiltinOperator.RESHAPE)


@dataclass(frozen=True)
class OpEntry:
    index: int
    op: str  # builtin name ("CONV_2D"), or the custom code of a CUSTOM op
    version: int
    outputs: tuple[str, ...]  # output tensor names (litert-torch's carry the torch module path)


def op_list(model: schema.ModelT, subgraph: int = 0) -> list[OpEntry]:
    """Every operator of one subgraph, in execution order."""
    graph = model.subgraphs[subgraph]
    entries = []
    for index, op in enumerate(graph.operators or []):
        code = model.operatorCodes[op.opcodeIndex]
        name = builtin_name(builtin_code(model, op))
        if name == "CUSTOM" and code.customCode:
            name = code.customCode.decode() if isinstance(code.customCode, bytes) else str(code.customCode)
        outputs = tuple(tensor_name(graph.tensors[int(t)]) for t in (op.outputs if op.outputs is not None else []) if t >= 0)
        entries.append(OpEntry(index, name, int(code.version), outputs))
    return entries


def stored_weight(model: schema.ModelT, op: schema.OperatorT, producers: dict,
                  graph: schema.SubGraphT | None = None) -> int | None:
    """The index of the constant a conv/depthwise/FC op's weight is stored in (through the DENSIFY of sparse
    storage and the DEQUANTIZE of fp16 weights), or None for an op without weights. ``graph``: the subgraph
    ``op`` is in (default: the main one)."""
    slot = WEIGHT_INPUT.get(builtin_code(model, op))
    if slot is None or slot >= len(op.inputs) or op.inputs[slot] < 0:
        return None
    read = weight = int(op.inputs[slot])
    while weight in producers and builtin_code(model, producers[weight]) in _UNPACKING:
        weight = int(producers[weight].inputs[0])
    graph = model.subgraphs[0] if graph is None else graph
    return weight if model.buffers[graph.tensors[weight].buffer].data is not None else read


def op_precision(model: schema.ModelT, graph: schema.SubGraphT, op: schema.OperatorT, producers: dict) -> str:
    """What an op computes in: a weight op's 'int8' (int8 input), 'dynamic_int8' (int8 weights, float input),
    'fp16' or 'fp32' (its stored weights' type, through DENSIFY and DEQUANTIZE); QUANTIZE/DEQUANTIZE the
    border they make; any other op its output's type. ``producers``: tensor index -> the op writing it."""
    code = builtin_code(model, op)
    inputs = [graph.tensors[int(t)] if t >= 0 else None for t in op.inputs]
    weight = stored_weight(model, op, producers, graph)
    if weight is not None and inputs[0] is not None:
        if inputs[0].type == schema.TensorType.INT8:
            return "int8"
        return {schema.TensorType.INT8: "dynamic_int8", schema.TensorType.FLOAT16: "fp16"}.get(graph.tensors[weight].type, "fp32")
    outputs = [graph.tensors[int(t)].type for t in op.outputs]
    if code == schema.BuiltinOperator.QUANTIZE and inputs[0] is not None:
        return f"{tensor_type_name(inputs[0].type)}->{tensor_type_name(outputs[0])}"
    if code == schema.BuiltinOperator.DEQUANTIZE and inputs[0] is not None:
        constant = model.buffers[inputs[0].buffer].data is not None
        return f"{tensor_type_name(inputs[0].type)} weight unpacked" if constant else f"{tensor_type_name(inputs[0].type)}->float32"
    return tensor_type_name(outputs[0]) if outputs else ""
