"""Flatbuffer pass: store pruned int8 weights in TFLite's sparse format, only where it saves bytes.

The format (``SparsityParameters`` in the TFLite schema): a sparse tensor keeps its dense shape and
quantization; its buffer holds only the values that survive, in traversal order. ``traversal_order``
lists the tensor's n dims, then its k block dims; ``block_map`` says which tensor dim each block dim
splits; ``dim_metadata`` has one entry per traversed dim. A DENSE dim stores ``dense_size``
(for a blocked dim: size / block size); a SPARSE_CSR dim stores ``array_segments`` (one more than
the positions of the level above) and ``array_indices`` (the coordinate of every kept child, whose
subtree has a non-zero). Each index vector may be uint8, uint16 or int32, independently.

What this pass writes: identity traversal order; optionally 1xb blocks (b = 2..32, dividing the dim)
along the last dim (the input-channel dim of conv OHWI and FC [O, I], the channel dim of depthwise
[1, kh, kw, C]); each tensor dim DENSE or SPARSE_CSR, block dims DENSE (the runtime's
FormatConverter reads block sizes from dense_size, which the interpreter copies for DENSE dims only:
a CSR block dim dies with SIGFPE in allocate_tensors). For every int8 weight with zeros it computes
the exact payload of each such layout (values, including zeros inside kept blocks, plus every index
vector at the narrowest of uint8/uint16/int32 that fits it), takes the smallest, and stores it
only if that plus its flatbuffer overhead (SparsityParameters tables, DENSIFY op and tensor: about
320-360 bytes) is smaller than dense. 1x2 blocks matter for unstructured sparsity on 512-wide
inputs: they halve the index range so indices fit uint8. Conv and depthwise conv can't read sparse
weights: each gets a DENSIFY op, placed right before its first consumer (run once at load; XNNPACK
takes it and densifies while building its graph), whose output carries the weight's per-channel
quantization. Equal quantization tables and vectors are written once (``share_quantization``):
per-channel int64 zero points are all zeros, and a DENSIFY output repeats its weight's scales.

Decision for the int8 classifier (FULLY_CONNECTED): it stays dense. Measured with ai-edge-litert
2.3.0 on x86:
  - FC fed by DENSIFY: "failed to delegate FULLY_CONNECTED", XNNPACK fails to prepare, no load.
  - FC reading 1x16-block weights directly (the only int8 sparse FC format, [DENSE, CSR, DENSE 16],
    ``sparse_int8_fc=True``): the builtin and reference kernels are bit-exact, but XNNPACK takes the
    node and returns wrong logits (off by up to 80 LSB). XNNPACK is the default CPU path, so no.
    ``test_xnnpack_misreads_1x16_sparse_int8_fc`` fails once the runtime gets this right.
The classifier is a small share of a CNN (1024x10 = 10 KB of the demo model's 1.15 MB dense int8 file).
Hybrid FCs (float input, int8 weights) stay dense too: their sparse kernel needs op version 8, which
needs an op code of its own, and sparselite's int8 export doesn't produce them.

The ``keep_stablehlo_constant`` metadata is a model-wide flag ("true") read by TF's sparsify pass,
not by the runtime, and this pass reads int8 weights whatever the flag says, so it is left alone.
Signature defs refer to tensors by index; this pass only appends tensors, so they stay valid.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from sparselite.errors import SparseliteError
from sparselite.export.flatbuffer import WEIGHT_INPUT, builtin_code, builtin_name, operator_code_index, read_model, write_model

# Whether an int8 FULLY_CONNECTED may read 1x16-block sparse weights directly (see the docstring).
SPARSE_INT8_FC = False
# File bytes a sparse tensor costs beyond its payload (measured: 320-355 for a 4-D conv weight):
# the SparsityParameters tables, and the DENSIFY op with its output tensor.
_METADATA_OVERHEAD = 40
_DIM_OVERHEAD = 32
_DENSIFY_OVERHEAD = 160

_BLOCK_SIZES = (2, 4, 8, 16, 32)
_INDEX_TYPES = (  # (union tag, dtype, schema vector class), narrowest first
    (schema.SparseIndexVector.Uint8Vector, np.uint8, schema.Uint8VectorT),
    (schema.SparseIndexVector.Uint16Vector, np.uint16, schema.Uint16VectorT),
    (schema.SparseIndexVector.Int32Vector, np.int32, schema.Int32VectorT),
)
_DTYPE_NAMES = {np.uint8: "uint8", np.uint16: "uint16", np.int32: "int32"}
_TFLITE_NUMPY = {
    schema.TensorType.INT8: np.int8,
    schema.TensorType.UINT8: np.uint8,
    schema.TensorType.INT16: np.int16,
    schema.TensorType.INT32: np.int32,
    schema.TensorType.INT64: np.int64,
    schema.TensorType.FLOAT32: np.float32,
    schema.TensorType.FLOAT16: np.float16,
}


@dataclass(frozen=True)
class TensorEncoding:
    """What the pass decided for one weight tensor. Bytes count payload: values plus index vectors."""

    name: str
    op: str  # consuming op, e.g. "CONV_2D"
    shape: tuple[int, ...]
    sparsity: float  # fraction of exact zeros
    encoding: str  # "dense" | "csr" | "block_csr 1x16"
    index_dtype: str  # e.g. "uint16/uint8" (one per index vector, deduplicated) or "-" when dense
    dense_bytes: int
    stored_bytes: int
    min_bytes: int  # smallest layout this pass knows for the tensor, whether or not the consumer can use it
    densify: bool  # a DENSIFY op was inserted in front of the consumer
    reason: str = ""  # why a tensor with zeros stayed dense

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Layout:
    """Identity traversal order; the last dim optionally split into (size/block, block), the block
    dim traversed last; ``csr`` says, per level, SPARSE_CSR (True) or DENSE."""

    block: int  # length of the block along the last dim (1 = not blocked)
    csr: tuple[bool, ...]  # one per level: the tensor dims, then the block dim (always DENSE) when block > 1

    @property
    def name(self) -> str:
        return "csr" if self.block == 1 else f"block_csr 1x{self.block}"


def index_dtype_for(max_value: int) -> type:
    """Narrowest index type that holds ``max_value``."""
    for _, dtype, _ in _INDEX_TYPES:
        if max_value <= np.iinfo(dtype).max:
            return dtype
    raise SparseliteError(f"sparse index {max_value} does not fit int32; the tensor is too large to encode")


def _levels(shape: tuple[int, ...], block: int) -> tuple[int, ...]:
    return tuple(shape[:-1]) + ((shape[-1] // block, block) if block > 1 else (shape[-1],))


def _kept_counts(weights: np.ndarray, block: int) -> list[int]:
    """Per level: how many prefixes (coordinates down to that level) have a non-zero below them."""
    nonzero = weights.reshape(_levels(weights.shape, block)) != 0
    counts = [int(nonzero.sum())]
    for axis in range(nonzero.ndim - 1, 0, -1):
        nonzero = nonzero.any(axis=axis)
        counts.append(int(nonzero.sum()))
    return counts[::-1]


def _layout_bytes(sizes: tuple[int, ...], counts: list[int], csr: tuple[bool, ...], itemsize: int) -> int:
    """Exact payload bytes (values + index vectors) of a layout, from the kept counts alone.

    A CSR level keeps exactly the prefixes with a non-zero below (their parents are then kept too);
    a DENSE level multiplies the positions of the level above by its size.
    """
    total, positions = 0, 1
    for size, kept, is_csr in zip(sizes, counts, csr):
        if is_csr:
            total += (positions + 1) * np.dtype(index_dtype_for(kept)).itemsize  # segments
            total += kept * np.dtype(index_dtype_for(size - 1)).itemsize  # indices
            positions = kept
        else:
            positions *= size
    return total + positions * itemsize


def _candidate_layouts(shape: tuple[int, ...]) -> list[_Layout]:
    # Blocks save indices when zeros come in runs (1x4, 1x16 pruning); 1x2 also halves the index
    # range, so a 512-wide dim gets uint8 indices. Block dims must be DENSE: the runtime's
    # FormatConverter takes block sizes from dense_size, which it reads for DENSE dims only
    # (a CSR block dim crashes the interpreter with SIGFPE at allocate_tensors).
    blocks = [1] + [b for b in _BLOCK_SIZES if shape[-1] % b == 0 and shape[-1] > b]
    return [
        _Layout(block, csr + ((False,) if block > 1 else ()))
        for block in blocks
        for csr in itertools.product((False, True), repeat=len(shape))
        if any(csr)
    ]


def _best_layout(weights: np.ndarray, layouts: list[_Layout], overhead: int) -> tuple[_Layout | None, int]:
    """The layout with the fewest payload bytes, if that plus ``overhead`` beats dense; and its bytes."""
    best, best_bytes = None, weights.nbytes
    counts = {}
    for layout in layouts:
        if layout.block not in counts:
            counts[layout.block] = _kept_counts(weights, layout.block)
        size = _layout_bytes(_levels(weights.shape, layout.block), counts[layout.block], layout.csr, weights.itemsize)
        if size < best_bytes:
            best, best_bytes = layout, size
    if best is not None and best_bytes + overhead >= weights.nbytes:
        best = None
    return best, best_bytes


def _index_vector(values: np.ndarray) -> tuple[int, object, type]:
    dtype = index_dtype_for(int(values.max()) if values.size else 0)
    tag, _, cls = next(t for t in _INDEX_TYPES if t[1] is dtype)
    vector = cls()
    vector.values = values.astype(dtype)
    return tag, vector, dtype


def encode_tensor(weights: np.ndarray, layout: _Layout) -> tuple[np.ndarray, schema.SparsityParametersT, list[type]]:
    """Values (in traversal order), SparsityParameters and index dtypes of ``weights`` stored as ``layout``."""
    n = weights.ndim
    sizes = _levels(weights.shape, layout.block)
    expanded = weights.reshape(sizes)
    nonzero = expanded != 0
    positions = np.zeros((1, 0), dtype=np.int64)  # coordinates of each kept prefix, in level order
    metadata, dtypes = [], []
    for level, size in enumerate(sizes):
        children = np.concatenate(
            [np.repeat(positions, size, axis=0), np.tile(np.arange(size), len(positions))[:, None]], axis=1
        )
        dim = schema.DimensionMetadataT()
        dim.denseSize = size  # read for block dims whatever their format (TFLite's FormatConverter)
        if layout.csr[level]:
            below = tuple(range(level + 1, len(sizes)))
            keep = (nonzero.any(axis=below) if below else nonzero)[tuple(children.T)]
            segments = np.concatenate([[0], np.cumsum(keep.reshape(len(positions), size).sum(axis=1))])
            dim.format = schema.DimensionType.SPARSE_CSR
            dim.arraySegmentsType, dim.arraySegments, seg_dtype = _index_vector(segments)
            dim.arrayIndicesType, dim.arrayIndices, idx_dtype = _index_vector(children[keep, level])
            dtypes += [seg_dtype, idx_dtype]
            positions = children[keep]
        else:
            dim.format = schema.DimensionType.DENSE
            positions = children
        metadata.append(dim)
    params = schema.SparsityParametersT()
    params.traversalOrder = list(range(len(sizes)))
    params.blockMap = [n - 1] if layout.block > 1 else None
    params.dimMetadata = metadata
    return expanded[tuple(positions.T)], params, dtypes


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
    if buffer.data is None or len(buffer.data) == 0 or tensor.type not in _TFLITE_NUMPY:
        return None
    flat = np.frombuffer(np.asarray(buffer.data, dtype=np.uint8).tobytes(), dtype=_TFLITE_NUMPY[tensor.type])
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
                name = _DTYPE_NAMES.get(np.asarray(vector.values).dtype.type, str(np.asarray(vector.values).dtype))
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


def weight_sparsity(source: bytes | str | Path) -> dict[str, float]:
    """Fraction of exact zeros of every constant weight of conv/depthwise/FC ops, dense or sparse-stored."""
    model = read_model(source)
    result = {}
    for graph in model.subgraphs:
        for tensor_index, _op in _weight_tensors(model, graph):
            tensor = graph.tensors[tensor_index]
            values = tensor_values(model, tensor)
            if values is not None and values.size:
                result[_name(tensor)] = float(np.mean(values == 0))
    return result


def _name(tensor: schema.TensorT) -> str:
    name = tensor.name
    return name.decode() if isinstance(name, bytes) else str(name)


def _weight_tensors(model: schema.ModelT, graph: schema.SubGraphT):
    """(tensor index, op index) for every weight input of conv/depthwise/FC, following DENSIFY back."""
    densified = {}
    for op in graph.operators:
        if builtin_code(model, op) == schema.BuiltinOperator.DENSIFY:
            densified[int(op.outputs[0])] = int(op.inputs[0])
    seen = set()
    for op_index, op in enumerate(graph.operators):
        slot = WEIGHT_INPUT.get(builtin_code(model, op))
        if slot is None or len(op.inputs) <= slot or op.inputs[slot] < 0:
            continue
        tensor_index = densified.get(int(op.inputs[slot]), int(op.inputs[slot]))
        if tensor_index not in seen:
            seen.add(tensor_index)
            yield tensor_index, op_index


def encode_sparse(
    data: bytes | str | Path,
    min_sparsity: float = 0.0,
    *,
    share_quantization: bool = True,
    sparse_int8_fc: bool | None = None,
) -> tuple[bytes, list[TensorEncoding]]:
    """Re-encode the int8 conv/depthwise/FC weights of a .tflite so that pruned zeros cost fewer bytes.

    Takes .tflite bytes (or a path) and returns new .tflite bytes, to be written with
    ``write_atomically``, plus one ``TensorEncoding`` per int8 weight tensor. A weight is considered
    when it has zeros and at least ``min_sparsity`` of it is zeros; it is stored sparse only when
    that, with the DENSIFY op and metadata it brings, is smaller than dense. ``share_quantization``
    writes equal quantization tables and vectors once (lossless; per-channel zero points are all
    zeros, and a DENSIFY output repeats its weight's scales). ``sparse_int8_fc`` overrides
    ``SPARSE_INT8_FC`` (whether an int8 FC may read 1x16-block weights directly).
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise SparseliteError(f"min_sparsity={min_sparsity} must be in [0, 1]")
    fc_direct = SPARSE_INT8_FC if sparse_int8_fc is None else sparse_int8_fc
    model = read_model(data)
    reports: list[TensorEncoding] = []
    buffer_users: dict[int, int] = {}  # buffers are model-wide; a shared one must stay dense for the others
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            buffer_users[tensor.buffer] = buffer_users.get(tensor.buffer, 0) + 1
    for graph in model.subgraphs:
        uses_of: dict[int, list[tuple[int, int]]] = {}
        for op_index, op in enumerate(graph.operators):
            for slot, tensor_index in enumerate(op.inputs if op.inputs is not None else []):
                uses_of.setdefault(int(tensor_index), []).append((op_index, slot))
        insertions: list[tuple[int, schema.OperatorT]] = []
        for tensor_index, _ in list(_weight_tensors(model, graph)):
            tensor = graph.tensors[tensor_index]
            if tensor.type != schema.TensorType.INT8 or tensor.sparsity is not None:
                continue
            weights = tensor_values(model, tensor)
            if weights is None or weights.size == 0:
                continue
            uses = uses_of.get(tensor_index, [])
            sparsity = float(np.mean(weights == 0))
            all_layouts = _candidate_layouts(weights.shape)
            entry = dict(
                name=_name(tensor),
                op="/".join(sorted({builtin_name(builtin_code(model, graph.operators[i])) for i, _ in uses})),
                shape=tuple(weights.shape),
                sparsity=sparsity,
                dense_bytes=weights.nbytes,
                min_bytes=_best_layout(weights, all_layouts, overhead=0)[1],
            )
            layouts, densify, reason = _policy(model, graph, uses, weights, sparsity, min_sparsity, fc_direct)
            layout = None
            if layouts:
                overhead = _METADATA_OVERHEAD + _DIM_OVERHEAD * (weights.ndim + 1) + (_DENSIFY_OVERHEAD if densify else 0)
                layout, _ = _best_layout(weights, layouts, overhead)
                if layout is None:
                    reason = "sparse storage would not be smaller"
            if layout is None:
                reports.append(TensorEncoding(**entry, encoding="dense", index_dtype="-",
                                              stored_bytes=weights.nbytes, densify=False, reason=reason))
                continue
            values, params, dtypes = encode_tensor(weights, layout)
            buffer = schema.BufferT()
            buffer.data = values.view(np.uint8)
            if buffer_users.get(tensor.buffer, 0) > 1:
                model.buffers.append(buffer)
                tensor.buffer = len(model.buffers) - 1
            else:
                model.buffers[tensor.buffer] = buffer
            tensor.sparsity = params
            if densify:
                insertions.append(_add_densify(model, graph, tensor_index, uses))
            names = list(dict.fromkeys(_DTYPE_NAMES[dtype] for dtype in dtypes))
            reports.append(TensorEncoding(**entry, encoding=layout.name, index_dtype="/".join(names),
                                          stored_bytes=sparse_payload_bytes(model, tensor), densify=densify))
        for position, op in sorted(insertions, key=lambda item: item[0], reverse=True):
            graph.operators.insert(position, op)
    _share_quantization(model, by_content=share_quantization)
    return write_model(model), reports


def share_quantization_tables(data: bytes | str | Path) -> bytes:
    """The lossless part of the pass on its own: equal quantization tables and vectors written once.

    Applied to dense exports too, so that dense and sparse files differ only by sparse storage.
    """
    model = read_model(data)
    _share_quantization(model, by_content=True)
    return write_model(model)


def _policy(model, graph, uses, weights, sparsity, min_sparsity, fc_direct):
    """(allowed layouts, needs DENSIFY, reason when none) for one weight and its consumers."""
    if sparsity == 0.0:
        return [], False, "no zeros"
    if sparsity < min_sparsity:
        return [], False, f"sparsity {sparsity:.2f} < min_sparsity {min_sparsity:.2f}"
    codes = set()
    for op_index, slot in uses:
        op = graph.operators[op_index]
        code = builtin_code(model, op)
        if WEIGHT_INPUT.get(code) != slot:
            return [], False, f"also read by {builtin_name(code)} input {slot}"
        codes.add(code)
    if schema.BuiltinOperator.FULLY_CONNECTED not in codes:
        return _candidate_layouts(weights.shape), True, ""
    if len(codes) > 1:
        return [], False, "shared by FULLY_CONNECTED and another op"
    if not fc_direct:
        return [], False, "int8 FULLY_CONNECTED stays dense (see sparse.py)"
    for op_index, _ in uses:
        input_tensor = graph.tensors[graph.operators[op_index].inputs[0]]
        if input_tensor.type != schema.TensorType.INT8:
            return [], False, "hybrid FULLY_CONNECTED stays dense (its sparse kernel needs op version 8)"
    if weights.ndim != 2 or weights.shape[1] % 16:
        return [], False, "int8 FULLY_CONNECTED reads only 1x16 blocks; its input size is not a multiple of 16"
    return [_Layout(16, (False, True, False))], False, ""


def _add_densify(model, graph, tensor_index, uses) -> tuple[int, schema.OperatorT]:
    """A DENSIFY from the sparse weight to a new dense tensor that its consumers read instead."""
    tensor = graph.tensors[tensor_index]
    dense = schema.TensorT()
    dense.name = f"densified_{tensor_index}".encode()  # short: names cost file bytes
    dense.shape = list(tensor.shape)
    dense.shapeSignature = None if tensor.shapeSignature is None else list(tensor.shapeSignature)
    dense.type = tensor.type
    dense.buffer = 0  # buffer 0 is the schema's empty sentinel
    dense.hasRank = tensor.hasRank
    dense.quantization = tensor.quantization  # per-channel scales: packed once (_SharedQuantization)
    graph.tensors.append(dense)
    dense_index = len(graph.tensors) - 1
    for op_index, slot in uses:
        inputs = [int(t) for t in graph.operators[op_index].inputs]  # unpacked arrays are read-only
        inputs[slot] = dense_index
        graph.operators[op_index].inputs = inputs
    op = schema.OperatorT()
    op.opcodeIndex = operator_code_index(model, schema.BuiltinOperator.DENSIFY)
    op.inputs = [tensor_index]
    op.outputs = [dense_index]
    op.builtinOptionsType = schema.BuiltinOptions.DensifyOptions
    op.builtinOptions = schema.DensifyOptionsT()
    return min(op_index for op_index, _ in uses), op


class _PackCache:
    """Offsets already written into one flatbuffer builder, keyed by content."""

    def __init__(self):
        self.builder = None
        self.tables: dict[tuple, int] = {}
        self.vectors: dict[tuple, int] = {}

    def for_builder(self, builder) -> "_PackCache":
        if self.builder is not builder:
            self.builder, self.tables, self.vectors = builder, {}, {}
        return self


class _VectorSharingBuilder:
    """Forwards to a flatbuffers Builder, but writes each distinct numpy vector only once."""

    def __init__(self, builder, cache: _PackCache):
        self._builder, self._cache = builder, cache

    def __getattr__(self, name):
        return getattr(self._builder, name)

    def CreateNumpyVector(self, values):
        key = (values.dtype.str, values.shape, values.tobytes())
        if key not in self._cache.vectors:
            self._cache.vectors[key] = self._builder.CreateNumpyVector(values)
        return self._cache.vectors[key]


class _SharedQuantization:
    """QuantizationParameters packed so that equal tables and equal vectors are written once.

    The object API writes every tensor's per-channel scales and int64 zero points separately: 12
    bytes per channel for the weight, 12 more for the bias, and the same again for a DENSIFY output.
    The zero points are all zeros, so most of these vectors are equal; flatbuffers allow a table or
    vector to be referenced from several places, and readers can't tell the difference.
    """

    def __init__(self, table: schema.QuantizationParametersT, cache: _PackCache, by_content: bool):
        for field in ("min", "max", "scale", "zeroPoint"):  # lists would bypass CreateNumpyVector
            value = getattr(table, field)
            if value is not None and not isinstance(value, np.ndarray):
                setattr(table, field, np.asarray(value, dtype=np.int64 if field == "zeroPoint" else np.float32))
        self._table, self._cache, self._by_content = table, cache, by_content

    def __getattr__(self, name):  # reads (scale, zeroPoint, ...) go to the wrapped table
        return getattr(self.__dict__["_table"], name)

    def _key(self) -> tuple | None:
        table = self._table
        if not self._by_content:
            return ("same object", id(table))  # still one copy for a weight and its DENSIFY output
        if table.details is not None:
            return None
        arrays = tuple(None if v is None else (v.dtype.str, v.tobytes()) for v in (table.min, table.max, table.scale, table.zeroPoint))
        return arrays + (table.quantizedDimension,)

    def Pack(self, builder):
        cache = self._cache.for_builder(builder)
        key = self._key()
        if key is None:
            return self._table.Pack(builder)
        if key not in cache.tables:
            packer = _VectorSharingBuilder(builder, cache) if self._by_content else builder
            cache.tables[key] = self._table.Pack(packer)
        return cache.tables[key]


def _share_quantization(model: schema.ModelT, by_content: bool) -> None:
    cache = _PackCache()
    wrapped: dict[int, _SharedQuantization] = {}
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            table = tensor.quantization
            if table is not None and not isinstance(table, _SharedQuantization):
                if id(table) not in wrapped:
                    wrapped[id(table)] = _SharedQuantization(table, cache, by_content)
                tensor.quantization = wrapped[id(table)]
