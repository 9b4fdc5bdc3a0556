"""Small edits of a converted flatbuffer (object API) that the XNNPACK forms share: reading int32
constants, who reads and who writes a tensor, a RESHAPE between two tensors."""

from __future__ import annotations

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from sparselite.tflite.flatbuffer import append_tensor, operator_code_index


def constant_ints(model: schema.ModelT, tensor: int) -> np.ndarray | None:
    data = model.buffers[model.subgraphs[0].tensors[tensor].buffer].data
    return None if data is None else np.asarray(data, dtype=np.uint8).view(np.int32)


def readers_of(subgraph: schema.SubGraphT) -> dict[int, list[int]]:
    readers: dict[int, list[int]] = {}
    for index, op in enumerate(subgraph.operators):
        for tensor in op.inputs if op.inputs is not None else []:
            readers.setdefault(int(tensor), []).append(index)
    return readers


def producers_of(subgraph: schema.SubGraphT) -> dict[int, schema.OperatorT]:
    return {int(tensor): op for op in subgraph.operators for tensor in op.outputs}


def axes_before(perm: np.ndarray, axes: np.ndarray) -> np.ndarray | None:
    """The axes of the transpose's input that ``axes`` of its output are, when the axes the mean
    keeps stay in the same order (so the mean's output is laid out the same); None otherwise."""
    rank = len(perm)
    reduced = {int(a) % rank for a in axes}
    kept = [int(perm[a]) for a in range(rank) if a not in reduced]
    if kept != sorted(kept):
        return None
    return np.array(sorted(int(perm[a]) for a in reduced), dtype=np.int32)


def same_quantization(a: schema.TensorT, b: schema.TensorT) -> bool:
    def params(t):
        q = t.quantization
        if q is None or q.scale is None or not len(q.scale):
            return None
        return [float(v) for v in q.scale], [int(v) for v in q.zeroPoint]
    return a.type == b.type and params(a) == params(b)


def reshape_op(model: schema.ModelT, source: int, target: int) -> schema.OperatorT:
    """A RESHAPE of tensor ``source`` into tensor ``target`` (same values, the target's shape)."""
    shape = [int(d) for d in model.subgraphs[0].tensors[target].shape]
    reshape = schema.OperatorT()
    reshape.opcodeIndex = operator_code_index(model, schema.BuiltinOperator.RESHAPE)
    reshape.inputs = [source, append_tensor(model, [len(shape)], schema.TensorType.INT32, b"reshape_to",
                                            data=np.array(shape, dtype="<i4").tobytes())]
    reshape.outputs = [target]
    return reshape


WEIGHT_DTYPES = {schema.TensorType.INT8: np.int8, schema.TensorType.FLOAT32: np.float32,
                  schema.TensorType.FLOAT16: np.float16}
