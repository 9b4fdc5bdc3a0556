"""Checks that an unpacked .tflite is safe to hand to LiteRT's C++ interpreter.

LiteRT verifies a file's flatbuffer structure (offsets, vector lengths) before it builds an
interpreter, but not what the values mean: an op input that names a tensor past the end, a sparse
index past its dimension, a ``dense_size`` of 2^31-1, a zero quantization scale or a stride of 0 reach
C++ kernels that trust them, and end in a segfault, an abort ("double free or corruption"), or a
loop that runs for minutes. ``validate_model`` checks every such value sparselite's files (and
LiteRT's own converters' files) can carry, against the model and against the file's size, and raises
one ``SparseliteError`` naming the first problem. See docs/untrusted_files.md for what runs when.

The limits below are far above any model this plugin targets (edge classifiers), and low enough that
LiteRT can allocate what a file declares without exhausting memory.
"""

from __future__ import annotations

import math

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from sparselite.errors import SparseliteError

MAX_RANK = 8
MAX_TENSOR_BYTES = 1 << 30  # one tensor, as declared by its shape and type
MAX_TOTAL_TENSOR_BYTES = 4 << 30  # all tensors of a subgraph together

_ITEMSIZE = {
    schema.TensorType.FLOAT32: 4, schema.TensorType.FLOAT16: 2, schema.TensorType.INT32: 4,
    schema.TensorType.UINT8: 1, schema.TensorType.INT64: 8, schema.TensorType.BOOL: 1,
    schema.TensorType.INT16: 2, schema.TensorType.COMPLEX64: 8, schema.TensorType.INT8: 1,
    schema.TensorType.FLOAT64: 8, schema.TensorType.COMPLEX128: 16, schema.TensorType.UINT64: 8,
    schema.TensorType.UINT32: 4, schema.TensorType.UINT16: 2, schema.TensorType.BFLOAT16: 2,
}
_KNOWN_TYPES = frozenset(v for k, v in vars(schema.TensorType).items() if not k.startswith("_"))
_KNOWN_BUILTINS = frozenset(v for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_"))
_WINDOW_OPTIONS = (schema.Conv2DOptionsT, schema.DepthwiseConv2DOptionsT, schema.Pool2DOptionsT,
                   schema.Conv3DOptionsT, schema.TransposeConvOptionsT)

_OP = schema.BuiltinOperator
# Input slots a builtin kernel treats as optional (-1: absent). Every other slot an op lists must name
# a tensor: XNNPACK and several kernels index the tensor array with it unchecked (a CONV_2D whose weight
# is -1 is a segfault at allocate_tensors).
_LSTM_OPTIONAL = frozenset({1, 5, 9, 10, 11, 12, 16, 17, 20, 21, 22, 23})
_OPTIONAL_INPUTS: dict[int, frozenset[int]] = {
    _OP.CONV_2D: frozenset({2}), _OP.DEPTHWISE_CONV_2D: frozenset({2}), _OP.FULLY_CONNECTED: frozenset({2}),
    _OP.CONV_3D: frozenset({2}), _OP.TRANSPOSE_CONV: frozenset({3}), _OP.CONV_3D_TRANSPOSE: frozenset({3}),
    _OP.SVDF: frozenset({3}), _OP.PAD: frozenset({2}), _OP.PADV2: frozenset({2}), _OP.LSH_PROJECTION: frozenset({2}),
    _OP.LSTM: _LSTM_OPTIONAL, _OP.UNIDIRECTIONAL_SEQUENCE_LSTM: _LSTM_OPTIONAL,
    _OP.BIDIRECTIONAL_SEQUENCE_LSTM: frozenset({1, 5, 9, 10, 11, 12, 16, 17, 18, 22, 26, 27, 28, 29, 33, 34,
                                                *range(39, 48)}),
    _OP.BIDIRECTIONAL_SEQUENCE_RNN: frozenset({9, 10, 11}),
}
# Ops whose inputs this table does not describe (their kernels are not LiteRT's builtins).
_UNDESCRIBED = frozenset({_OP.CUSTOM, _OP.DELEGATE}) | frozenset(
    v for k, v in vars(_OP).items() if k.startswith("STABLEHLO_"))
# The fewest inputs the kernels sparselite's files (and LiteRT's converters' edge models) use read.
_MIN_INPUTS: dict[int, int] = {
    **dict.fromkeys((_OP.CONV_2D, _OP.DEPTHWISE_CONV_2D, _OP.FULLY_CONNECTED, _OP.ADD, _OP.SUB, _OP.MUL, _OP.DIV,
                     _OP.MAXIMUM, _OP.MINIMUM, _OP.SQUARED_DIFFERENCE, _OP.MEAN, _OP.SUM, _OP.REDUCE_MAX, _OP.PAD,
                     _OP.PADV2, _OP.TRANSPOSE, _OP.BATCH_MATMUL, _OP.GATHER, _OP.RESIZE_BILINEAR,
                     _OP.RESIZE_NEAREST_NEIGHBOR, _OP.EXPAND_DIMS, _OP.BROADCAST_TO), 2),
    **dict.fromkeys((_OP.TRANSPOSE_CONV, _OP.SLICE, _OP.SELECT, _OP.SELECT_V2), 3),
    _OP.STRIDED_SLICE: 4,
    **dict.fromkeys((_OP.RESHAPE, _OP.CONCATENATION, _OP.QUANTIZE, _OP.DEQUANTIZE, _OP.AVERAGE_POOL_2D,
                     _OP.MAX_POOL_2D, _OP.SOFTMAX, _OP.LOGISTIC, _OP.TANH, _OP.RELU, _OP.RELU6, _OP.HARD_SWISH,
                     _OP.RSQRT, _OP.GELU, _OP.LEAKY_RELU, _OP.SQUEEZE), 1),
}


class _Invalid(Exception):
    """A problem found deep in the checks; ``validate_model`` prefixes the file's name."""


def validate_model(model: schema.ModelT, file_bytes: int, name: str = "the model") -> None:
    """Raise ``SparseliteError`` unless every index, size and sparse structure in ``model`` is in range.

    ``file_bytes`` is the size of the file it was read from: buffers stored after the flatbuffer
    (offset/size) must lie inside it, and sparse index vectors cannot describe more values than a
    file of that size holds.
    """
    try:
        _check_model(model, file_bytes)
    except _Invalid as err:
        raise SparseliteError(f"{name} is not a valid TFLite model: {err}; re-export it") from None


def _check_model(model: schema.ModelT, file_bytes: int) -> None:
    buffers = model.buffers or []
    codes = model.operatorCodes or []
    if not model.subgraphs:
        raise _Invalid("it has no subgraphs")
    for index, buffer in enumerate(buffers):
        offset, size = int(buffer.offset or 0), int(buffer.size or 0)
        if offset > 1 and (size < 0 or offset + size > file_bytes):
            raise _Invalid(f"buffer {index} points at bytes {offset}..{offset + size}, past the end of the file ({file_bytes} B)")
    for index, code in enumerate(codes):
        builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        if builtin not in _KNOWN_BUILTINS:
            raise _Invalid(f"operator code {index} is an unknown operator ({builtin})")
    for index, code in enumerate(codes):
        _text(code.customCode, f"the custom code of operator code {index}")
    for entry in model.metadata or []:
        _text(entry.name, "a metadata name")
        _index(entry.buffer, len(buffers), "a metadata entry's buffer")
    for value in model.metadataBuffer if model.metadataBuffer is not None else []:
        _index(value, len(buffers), "a metadata buffer")
    for number, graph in enumerate(model.subgraphs):
        _check_subgraph(model, graph, number, file_bytes)
    for signature in model.signatureDefs or []:
        graph_index = _index(signature.subgraphIndex, len(model.subgraphs), "a signature's subgraph")
        tensors = len(model.subgraphs[graph_index].tensors or [])
        _text(signature.signatureKey, "a signature key")
        for entry in (signature.inputs or []) + (signature.outputs or []):
            _text(entry.name, "a signature's tensor name")
            _index(entry.tensorIndex, tensors, "a signature's tensor")


def _index(value, size: int, what: str, optional: bool = False) -> int:
    value = int(value)
    if not (0 <= value < size or (optional and value == -1)):
        raise _Invalid(f"{what} is {value}, outside 0..{size - 1}")
    return value


def _text(value, what: str) -> None:
    """Names are read back as UTF-8 (by LiteRT's Python API too): undecodable bytes are an error."""
    if isinstance(value, bytes):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            raise _Invalid(f"{what} is not UTF-8 text") from None


def _check_subgraph(model: schema.ModelT, graph: schema.SubGraphT, number: int, file_bytes: int) -> None:
    tensors = graph.tensors or []
    where = f"subgraph {number}"
    _text(graph.name, f"the name of {where}")
    for value in _ints(graph.inputs):
        _index(value, len(tensors), f"an input of {where}")
    for value in _ints(graph.outputs):
        _index(value, len(tensors), f"an output of {where}")
    total = 0
    for index, tensor in enumerate(tensors):
        total += _check_tensor(model, tensor, f"tensor {index} of {where}", file_bytes)
        if total > MAX_TOTAL_TENSOR_BYTES:
            raise _Invalid(f"the tensors of {where} declare more than {MAX_TOTAL_TENSOR_BYTES >> 30} GiB")
    for op_index, op in enumerate(graph.operators or []):
        what = f"op {op_index} of {where}"
        code = model.operatorCodes[_index(op.opcodeIndex, len(model.operatorCodes or []), f"the operator code of {what}")]
        for value in _ints(op.inputs):
            _index(value, len(tensors), f"an input of {what}", optional=True)
        for value in _ints(op.outputs):
            _index(value, len(tensors), f"an output of {what}", optional=True)
        for value in _ints(op.intermediates):
            _index(value, len(tensors), f"an intermediate of {what}")
        _check_options(op, what)
        builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        _check_required_inputs(builtin, _ints(op.inputs), what)
        if builtin == schema.BuiltinOperator.DENSIFY and (len(_ints(op.inputs)) != 1 or len(_ints(op.outputs)) != 1
                                                          or min(_ints(op.inputs) + _ints(op.outputs)) < 0):
            raise _Invalid(f"{what} is a DENSIFY without exactly one input and one output")
        for slot, value in enumerate(_ints(op.inputs)):
            if value >= 0 and tensors[value].sparsity is not None and not _reads_sparse(builtin, slot, int(code.version)):
                raise _Invalid(f"{what} ({_builtin_name(builtin)}, version {code.version}) reads sparse tensor {value} "
                               "directly; only DENSIFY, and FULLY_CONNECTED (version <= 8) weights, can")


def _check_required_inputs(builtin: int, inputs: list[int], what: str) -> None:
    """Every input the op's kernel reads is there: enough inputs, and -1 (absent) only where optional."""
    if builtin in _UNDESCRIBED:
        return
    fewest = _MIN_INPUTS.get(builtin, 0)
    if len(inputs) < fewest:
        raise _Invalid(f"{what} ({_builtin_name(builtin)}) has {len(inputs)} input(s); its kernel needs at least {fewest}")
    optional = _OPTIONAL_INPUTS.get(builtin, frozenset())
    for slot, value in enumerate(inputs):
        if value == -1 and slot not in optional:
            raise _Invalid(f"{what} ({_builtin_name(builtin)}) has no tensor at input {slot} (-1, absent), "
                           "which its kernel requires")


def _reads_sparse(builtin: int, slot: int, version: int) -> bool:
    if builtin == schema.BuiltinOperator.DENSIFY:
        return slot == 0
    # Newer FULLY_CONNECTED versions take paths (XNNPACK, per-channel hybrid) that read the compressed
    # buffer as dense: out-of-bounds reads.
    return builtin == schema.BuiltinOperator.FULLY_CONNECTED and slot == 1 and version <= 8


def _check_options(op: schema.OperatorT, what: str) -> None:
    options = op.builtinOptions
    if isinstance(options, _WINDOW_OPTIONS):
        for field in ("strideW", "strideH", "strideD", "dilationWFactor", "dilationHFactor", "dilationDFactor",
                      "filterWidth", "filterHeight"):
            if hasattr(options, field) and int(getattr(options, field)) < 1:
                raise _Invalid(f"{what} has {field}={getattr(options, field)}; it must be >= 1")
    if isinstance(options, schema.DepthwiseConv2DOptionsT) and int(options.depthMultiplier) < 0:
        raise _Invalid(f"{what} has depthMultiplier={options.depthMultiplier}")
    if isinstance(options, schema.ReshapeOptionsT) and options.newShape is not None:
        for dim in _ints(options.newShape):
            if dim < -1 or dim > MAX_TENSOR_BYTES:
                raise _Invalid(f"{what} reshapes to a dimension of {dim}")


def _ints(values) -> list[int]:
    return [] if values is None else [int(v) for v in values]


def _check_tensor(model: schema.ModelT, tensor: schema.TensorT, what: str, file_bytes: int) -> int:
    """Check one tensor; returns the bytes its shape declares."""
    _text(tensor.name, f"the name of {what}")
    if int(tensor.type) not in _KNOWN_TYPES:
        raise _Invalid(f"{what} has an unknown type ({tensor.type})")
    shape = _ints(tensor.shape)
    if len(shape) > MAX_RANK:
        raise _Invalid(f"{what} has rank {len(shape)} (more than {MAX_RANK})")
    if any(dim < 0 for dim in shape):
        raise _Invalid(f"{what} has a negative dimension in its shape {shape}")
    for dim in _ints(tensor.shapeSignature):
        if dim < -1:
            raise _Invalid(f"{what} has a dimension of {dim} in its shape signature")
    elements = math.prod(shape)
    declared = elements * _ITEMSIZE.get(int(tensor.type), 1)
    if declared > MAX_TENSOR_BYTES:
        raise _Invalid(f"{what} has shape {shape}: {declared} bytes, more than {MAX_TENSOR_BYTES >> 20} MiB")
    buffer_index = _index(tensor.buffer, len(model.buffers or []), f"the buffer of {what}")
    buffer = model.buffers[buffer_index]
    stored = len(buffer.data) if buffer.data is not None else int(buffer.size or 0) if int(buffer.offset or 0) > 1 else 0
    if tensor.quantization is not None:
        _check_quantization(tensor.quantization, shape, what)
    if tensor.sparsity is not None:
        if stored == 0:
            raise _Invalid(f"{what} is sparse but has no stored values")
        itemsize = _ITEMSIZE.get(int(tensor.type))
        if itemsize is None or stored % itemsize:
            raise _Invalid(f"{what} is sparse with {stored} stored bytes, not a whole number of {tensor.type} values")
        _check_sparsity(tensor.sparsity, shape, stored // itemsize, file_bytes, what)
    elif stored and int(tensor.type) in _ITEMSIZE and stored != declared:
        raise _Invalid(f"{what} has shape {shape} ({declared} bytes) but its buffer holds {stored} bytes")
    return declared


def _check_quantization(quant: schema.QuantizationParametersT, shape: list[int], what: str) -> None:
    scale = np.asarray(quant.scale if quant.scale is not None else [], dtype=np.float64)
    zero_point = np.asarray(quant.zeroPoint if quant.zeroPoint is not None else [], dtype=np.int64)
    if not len(scale):
        return
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise _Invalid(f"{what} has a quantization scale that is zero, negative or not finite")
    if len(zero_point) not in (0, len(scale)):
        raise _Invalid(f"{what} has {len(scale)} quantization scales but {len(zero_point)} zero points")
    if len(scale) > 1:
        axis = int(quant.quantizedDimension)
        if not 0 <= axis < len(shape) or shape[axis] != len(scale):
            raise _Invalid(f"{what} has {len(scale)} per-channel scales on dimension {axis} of shape {shape}")


def _check_sparsity(sparsity: schema.SparsityParametersT, shape: list[int], values: int, file_bytes: int,
                    what: str) -> None:
    """The sparse index must describe exactly ``values`` values, every index inside its dimension.

    Checked level by level without expanding anything: the number of positions at a level is bounded
    by what the file can store, so a hostile ``dense_size`` is refused before anything is allocated.
    """
    n = len(shape)
    order = _ints(sparsity.traversalOrder)
    block_map = _ints(sparsity.blockMap)
    metadata = sparsity.dimMetadata or []
    k = len(block_map)
    if sorted(order) != list(range(n + k)) or len(metadata) != n + k:
        raise _Invalid(f"{what} has a sparse traversal order {order} that is not a permutation of its {n + k} dims")
    if len(set(block_map)) != k or any(not 0 <= d < n for d in block_map):
        raise _Invalid(f"{what} has a sparse block map {block_map} outside its {n} dims")
    sizes = list(shape) + [0] * k  # size of every traversed dim: tensor dims (in blocks), then block dims
    for j, dim in enumerate(block_map):
        block = metadata[order.index(n + j)]
        size = int(block.denseSize)
        if block.format != schema.DimensionType.DENSE or size < 1 or shape[dim] % size:
            raise _Invalid(f"{what} has a sparse block of {size} that does not divide dimension {dim} ({shape[dim]})")
        sizes[n + j] = size
        sizes[dim] = shape[dim] // size
    positions = 1
    for level, dim in enumerate(metadata):
        size = sizes[order[level]]
        if dim.format == schema.DimensionType.DENSE:
            if int(dim.denseSize) != size:
                raise _Invalid(f"{what} has dense_size {dim.denseSize} at sparse level {level}, where the dimension is {size}")
            positions *= size
        elif dim.format == schema.DimensionType.SPARSE_CSR:
            segments, indices = _index_vector(dim.arraySegments), _index_vector(dim.arrayIndices)
            if segments is None or indices is None:
                raise _Invalid(f"{what} has a sparse level {level} without its index vectors")
            if (len(segments) != positions + 1 or segments[0] != 0 or segments[-1] != len(indices)
                    or np.any(np.diff(segments) < 0)):
                raise _Invalid(f"{what} has inconsistent array_segments at sparse level {level}")
            if len(indices) and (indices.min() < 0 or indices.max() >= size):
                raise _Invalid(f"{what} has a sparse index outside 0..{size - 1} at level {level}")
            positions = len(indices)
        else:
            raise _Invalid(f"{what} has an unknown sparse dimension format ({dim.format})")
        if positions > file_bytes:
            raise _Invalid(f"{what} declares {positions} sparse positions at level {level}, more than its file can hold")
    if positions != values:
        raise _Invalid(f"{what} stores {values} values but its sparse index describes {positions}")


def _index_vector(vector) -> np.ndarray | None:
    if vector is None or vector.values is None:
        return None
    return np.asarray(vector.values, dtype=np.int64)


def _builtin_name(code: int) -> str:
    return next((k for k, v in vars(schema.BuiltinOperator).items() if v == code and not k.startswith("_")), str(code))
