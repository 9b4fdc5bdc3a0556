"""Reading constant tensors back, dense or sparse-stored, as TFLite's runtime reads them.

The format (``SparsityParameters`` in the TFLite schema): a sparse tensor keeps its dense shape and
quantization; its buffer holds only the values that survive, in traversal order. ``traversal_order``
lists the tensor's n dims, then its k block dims; ``block_map`` says which tensor dim each block dim
splits; ``dim_metadata`` has one entry per traversed dim. A DENSE dim stores ``dense_size``
(for a blocked dim: size / block size); a SPARSE_CSR dim stores ``array_segments`` (one more than
the positions of the level above) and ``array_indices`` (the coordinate of every kept child, whose
subtree has a non-zero). Each index vector may be uint8, uint16 or int32, independently.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from sparselite.errors import SparseliteError
from sparselite.tflite.flatbuffer import WEIGHT_INPUT, builtin_code, read_model, tensor_name

INDEX_DTYPE_NAMES = {np.uint8: "uint8", np.uint16: "uint16", np.int32: "int32"}
TFLITE_NUMPY = {
    schema.TensorType.INT8: np.int8,
    schema.TensorType.UINT8: np.uint8,
    schema.TensorType.INT16: np.int16,
    schema.TensorType.INT32: np.int32,
    schema.TensorType.INT64: np.int64,
    schema.TensorType.FLOAT32: np.float32,
    schema.TensorType.FLOAT16: np.float16,
}


def _vector_values(vector) -> np.ndarray:
    if vector is None or vector.values is None:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(vector.values, dtype=np.int64)


def decode_tensor(values: np.ndarray, shape: tuple[int, ...], sparsity: schema.SparsityParametersT) -> np.ndarray:
    """Dense array from TFLite sparse storage (any traversal order and block map), as TFLite's
    FormatConverter reads it."""
    shape = tuple(int(s) for s in shape)
    n = len(shape)
    order = [int(t) for t in sparsity.traversalOrder]
    block_map = [int(b) for b in (sparsity.blockMap if sparsity.blockMap is not None else [])]
    metadata = sparsity.dimMetadata
    if len(order) != n + len(block_map) or len(metadata) != len(order):
        raise SparseliteError("sparse tensor has inconsistent traversal_order/block_map/dim_metadata; re-export it")
    block_size = {}
    for k, dim in enumerate(block_map):
        block_size[dim] = int(metadata[order.index(n + k)].denseSize)
    positions = np.zeros((1, 0), dtype=np.int64)
    for level, dim in enumerate(metadata):
        if dim.format == schema.DimensionType.DENSE:
            size = int(dim.denseSize)
            positions = np.concatenate(
                [np.repeat(positions, size, axis=0), np.tile(np.arange(size), len(positions))[:, None]], axis=1
            )
        else:
            segments = _vector_values(dim.arraySegments)
            indices = _vector_values(dim.arrayIndices)
            if len(segments) != len(positions) + 1:
                raise SparseliteError("sparse tensor has a wrong array_segments length; re-export it")
            counts = np.diff(segments)
            parents = np.repeat(np.arange(len(positions)), counts)
            positions = np.concatenate([positions[parents], indices[segments[0] : segments[-1], None]], axis=1)
    values = np.asarray(values).reshape(-1)
    if len(values) != len(positions):
        raise SparseliteError(f"sparse tensor stores {len(values)} values but its index says {len(positions)}")
    expanded = np.empty_like(positions)
    expanded[:, order] = positions  # column j = coordinate of expanded dim j
    coords = []
    for dim in range(n):
        coord = expanded[:, dim]
        if dim in block_size:
            coord = coord * block_size[dim] + expanded[:, n + block_map.index(dim)]
        coords.append(coord)
    dense = np.zeros(shape, dtype=values.dtype)
    dense[tuple(coords)] = values
    return dense


def tensor_values(model: schema.ModelT, tensor: schema.TensorT) -> np.ndarray | None:
    """The dense numpy value of a constant tensor (decoding sparse storage), or None if not constant."""
    buffer = model.buffers[tensor.buffer]
    if buffer.data is None or len(buffer.data) == 0 or tensor.type not in TFLITE_NUMPY:
        return None
    flat = np.frombuffer(np.asarray(buffer.data, dtype=np.uint8).tobytes(), dtype=TFLITE_NUMPY[tensor.type])
    shape = tuple(int(s) for s in (tensor.shape if tensor.shape is not None else []))
    if tensor.sparsity is not None:
        return decode_tensor(flat, shape, tensor.sparsity)
    return flat.reshape(shape)


def sparse_payload_bytes(model: schema.ModelT, tensor: schema.TensorT) -> int:
    """Bytes a constant tensor stores: its buffer plus, when sparse, its index vectors."""
    buffer = model.buffers[tensor.buffer]
    total = 0 if buffer.data is None else len(buffer.data)
    if tensor.sparsity is not None:
        for dim in tensor.sparsity.dimMetadata:
            for vector in (dim.arraySegments, dim.arrayIndices):
                if vector is not None and vector.values is not None:
                    total += np.asarray(vector.values).nbytes
    return total


def describe_layout(tensor: schema.TensorT) -> tuple[str, str]:
    """('dense' | 'csr' | 'block_csr 1xb', index dtypes) of a tensor as stored."""
    if tensor.sparsity is None:
        return "dense", "-"
    dtypes = []
    for dim in tensor.sparsity.dimMetadata:
        for vector in (dim.arraySegments, dim.arrayIndices):
            if vector is not None and vector.values is not None:
                dtype = np.asarray(vector.values).dtype
                name = INDEX_DTYPE_NAMES.get(dtype.type, str(dtype))
                if name not in dtypes:
                    dtypes.append(name)
    block_map = list(tensor.sparsity.blockMap) if tensor.sparsity.blockMap is not None else []
    order = list(tensor.sparsity.traversalOrder)
    n = len(tensor.shape)
    sizes = [1] * n
    for k, dim in enumerate(block_map):
        block_dim = tensor.sparsity.dimMetadata[order.index(n + k)]
        if block_dim.format == schema.DimensionType.DENSE:  # a CSR block dim is element-wise CSR
            sizes[int(dim)] = int(block_dim.denseSize)
    if all(size == 1 for size in sizes):
        return "csr", "/".join(dtypes)
    block = "x".join(str(s) for s in sizes[-2:]) if n >= 2 else str(sizes[0])
    return f"block_csr {block}", "/".join(dtypes)


def weight_tensors(model: schema.ModelT, graph: schema.SubGraphT) -> Iterator[tuple[int, int]]:
    """(tensor index, op index) for every weight input of conv/depthwise/FC, following DENSIFY back, and the
    DEQUANTIZE (an fp16 weight, dense or behind its DENSIFY) or RESHAPE (a large-kernel depthwise conv's,
    export/xnnpack_forms.py) of a constant."""
    source = {}  # an op's output -> the constant it is made from, at load
    for op in graph.operators:
        code = builtin_code(model, op)
        if code == schema.BuiltinOperator.DENSIFY:
            source[int(op.outputs[0])] = int(op.inputs[0])
        elif code in (schema.BuiltinOperator.DEQUANTIZE, schema.BuiltinOperator.RESHAPE) and len(op.inputs) and op.inputs[0] >= 0:
            read = source.get(int(op.inputs[0]), int(op.inputs[0]))
            if model.buffers[graph.tensors[read].buffer].data is not None:
                source[int(op.outputs[0])] = read
    seen = set()
    for op_index, op in enumerate(graph.operators):
        slot = WEIGHT_INPUT.get(builtin_code(model, op))
        if slot is None or len(op.inputs) <= slot or op.inputs[slot] < 0:
            continue
        tensor_index = source.get(int(op.inputs[slot]), int(op.inputs[slot]))
        if tensor_index not in seen:
            seen.add(tensor_index)
            yield tensor_index, op_index


def weight_sparsity(source: bytes | str | Path) -> dict[str, float]:
    """Fraction of exact zeros of every constant weight of conv/depthwise/FC ops, dense or sparse-stored."""
    model = read_model(source)
    result = {}
    for graph in model.subgraphs:
        for tensor_index, _op in weight_tensors(model, graph):
            tensor = graph.tensors[tensor_index]
            values = tensor_values(model, tensor)
            if values is not None and values.size:
                result[tensor_name(tensor)] = float(np.mean(values == 0))
    return result
