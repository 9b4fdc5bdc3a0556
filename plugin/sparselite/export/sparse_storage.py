"""Flatbuffer pass: store pruned weights in TFLite's sparse format, only where it saves bytes.

For every conv/depthwise/FC weight with zeros (int8, fp32, or fp16 behind its DEQUANTIZE), the pass takes
the smallest layout
``sparse_encoding`` knows and stores it only if that plus its flatbuffer overhead (SparsityParameters
tables, DENSIFY op and tensor: about 320-360 bytes) is smaller than dense. Conv and depthwise conv
can't read sparse weights: each gets a DENSIFY op, placed right before its first consumer (run once
at load; XNNPACK takes it and densifies while building its graph), whose output carries the weight's
per-channel quantization. Equal quantization tables are then written once (``quantization_sharing``).

Decision for the int8 classifier (FULLY_CONNECTED): it stays dense. With ai-edge-litert 2.3.0 on x86:
  - FC fed by DENSIFY: "failed to delegate FULLY_CONNECTED", XNNPACK fails to prepare, no load.
  - FC reading 1x16-block weights directly (the only int8 sparse FC format, [DENSE, CSR, DENSE 16],
    ``sparse_int8_fc=True``): the builtin and reference kernels are bit-exact, but XNNPACK takes the
    node and returns wrong logits (off by up to 80 LSB). XNNPACK is the default CPU path, so no.
    ``test_xnnpack_misreads_1x16_sparse_int8_fc`` fails once the runtime gets this right.
The classifier is a small share of a CNN's weights.

Float weights: an fp32 conv/depthwise/FC weight, and an fp16 weight (read by a DEQUANTIZE), get a DENSIFY
like int8 conv weights: XNNPACK densifies both at load and delegates the whole graph, with outputs equal
to the dense file's (``tests/export/test_precision.py``).

Dynamic-range weights (int8 weights read by an op with a float input) stay dense: XNNPACK 2.3 does not
delegate such an op fed by DENSIFY (docs/upstream/xnnpack_hybrid_conv_densify.md), and a hybrid FC's own
sparse kernel needs op version 8, which needs an op code of its own.

The ``keep_stablehlo_constant`` metadata is a model-wide flag ("true") read by TF's sparsify pass,
not by the runtime, and this pass reads int8 weights whatever the flag says, so it is left alone.
Signature defs refer to tensors by index; this pass only appends tensors, so they stay valid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from sparselite.errors import SparseliteError
from sparselite.export.quantization_sharing import share_quantization as _share_quantization
from sparselite.export.sparse_encoding import Layout, best_layout, candidate_layouts, encode_tensor
from sparselite.tflite.flatbuffer import (
    WEIGHT_INPUT, builtin_code, builtin_name, operator_code_index, read_model, tensor_name, write_model,
)
from sparselite.tflite.constant_values import INDEX_DTYPE_NAMES, sparse_payload_bytes, tensor_values, weight_tensors

_STORED_TYPES = (schema.TensorType.INT8, schema.TensorType.FLOAT32, schema.TensorType.FLOAT16)

# File bytes a sparse tensor costs beyond its payload (measured: 320-355 for a 4-D conv weight):
# the SparsityParameters tables, and the DENSIFY op with its output tensor.
_METADATA_OVERHEAD = 40
_DIM_OVERHEAD = 32
_DENSIFY_OVERHEAD = 160


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


def encode_sparse(
    data: bytes | str | Path,
    min_sparsity: float = 0.0,
    *,
    share_quantization: bool = True,
    sparse_int8_fc: bool = False,
    sparse_dynamic_range: bool = False,
) -> tuple[bytes, list[TensorEncoding]]:
    """Re-encode the conv/depthwise/FC weights of a .tflite so that pruned zeros cost fewer bytes.

    Takes .tflite bytes (or a path) and returns new .tflite bytes, to be written with
    ``write_atomically``, plus one ``TensorEncoding`` per int8, fp32 or fp16 weight tensor. A weight is considered
    when it has zeros and at least ``min_sparsity`` of it is zeros; it is stored sparse only when
    that, with the DENSIFY op and metadata it brings, is smaller than dense. ``share_quantization``
    writes equal quantization tables and vectors once (lossless; per-channel zero points are all
    zeros, and a DENSIFY output repeats its weight's scales). ``sparse_int8_fc``: let an int8 FC read
    1x16-block weights directly (off: XNNPACK misreads them, see the module docstring).
    ``sparse_dynamic_range``: give dynamic-range ops' weights a DENSIFY too (off: XNNPACK does not delegate
    them, see the module docstring).
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise SparseliteError(f"min_sparsity={min_sparsity} must be in [0, 1]")
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
        for tensor_index, _ in list(weight_tensors(model, graph)):
            tensor = graph.tensors[tensor_index]
            if tensor.type not in _STORED_TYPES or tensor.sparsity is not None:
                continue
            weights = tensor_values(model, tensor)
            if weights is None or weights.size == 0:
                continue
            uses = uses_of.get(tensor_index, [])
            report = _encode_weight(model, graph, tensor_index, weights, uses, min_sparsity, sparse_int8_fc,
                                    sparse_dynamic_range, shared_buffer=buffer_users.get(tensor.buffer, 0) > 1)
            reports.append(report)
            if report.densify:
                insertions.append(_add_densify(model, graph, tensor_index, uses))
        for position, op in sorted(insertions, key=lambda item: item[0], reverse=True):
            graph.operators.insert(position, op)
    _share_quantization(model, by_content=share_quantization)
    return write_model(model), reports


def _encode_weight(model, graph, tensor_index: int, weights: np.ndarray, uses: list[tuple[int, int]],
                   min_sparsity: float, sparse_int8_fc: bool, sparse_dynamic_range: bool,
                   shared_buffer: bool) -> TensorEncoding:
    """Store one weight sparse, in place, where the policy allows it and it saves bytes; says how."""
    tensor = graph.tensors[tensor_index]
    sparsity = float(np.mean(weights == 0))
    entry = dict(
        name=tensor_name(tensor),
        op="/".join(sorted({builtin_name(builtin_code(model, graph.operators[i])) for i, _ in uses})),
        shape=tuple(weights.shape),
        sparsity=sparsity,
        dense_bytes=weights.nbytes,
        min_bytes=best_layout(weights, candidate_layouts(weights.shape), overhead=0)[1],
    )
    layouts, densify, reason = _policy(model, graph, uses, weights, sparsity, min_sparsity, sparse_int8_fc,
                                       sparse_dynamic_range)
    layout = None
    if layouts:
        overhead = _METADATA_OVERHEAD + _DIM_OVERHEAD * (weights.ndim + 1) + (_DENSIFY_OVERHEAD if densify else 0)
        layout, _ = best_layout(weights, layouts, overhead)
        if layout is None:
            reason = "sparse storage would not be smaller"
    if layout is None:
        return TensorEncoding(**entry, encoding="dense", index_dtype="-", stored_bytes=weights.nbytes, densify=False,
                              reason=reason)
    values, params, dtypes = encode_tensor(weights, layout)
    buffer = schema.BufferT()
    buffer.data = values.view(np.uint8)
    if shared_buffer:
        model.buffers.append(buffer)
        tensor.buffer = len(model.buffers) - 1
    else:
        model.buffers[tensor.buffer] = buffer
    tensor.sparsity = params
    names = list(dict.fromkeys(INDEX_DTYPE_NAMES[dtype] for dtype in dtypes))
    return TensorEncoding(**entry, encoding=layout.name, index_dtype="/".join(names),
                          stored_bytes=sparse_payload_bytes(model, tensor), densify=densify)


def _policy(model, graph, uses, weights, sparsity, min_sparsity, sparse_int8_fc, sparse_dynamic_range):
    """(allowed layouts, needs DENSIFY, reason when none) for one weight and its consumers."""
    if sparsity == 0.0:
        return [], False, "no zeros"
    if sparsity == 1.0:  # a sparse tensor with no stored values is one LiteRT reads as having no data
        return [], False, "all zeros (a zero-initialized residual branch): a sparse tensor needs a stored value"
    if sparsity < min_sparsity:
        return [], False, f"sparsity {sparsity:.2f} < min_sparsity {min_sparsity:.2f}"
    if any(builtin_code(model, graph.operators[i]) == schema.BuiltinOperator.RESHAPE for i, _ in uses):
        return [], False, ("a large-kernel depthwise weight, read through the RESHAPE that keeps its conv on "
                           "TFLite's kernel (xnnpack_forms.py), stays dense")
    if weights.dtype == np.float16:  # read by its DEQUANTIZE, which a DENSIFY can feed
        if any(builtin_code(model, graph.operators[i]) != schema.BuiltinOperator.DEQUANTIZE or slot for i, slot in uses):
            return [], False, "an fp16 weight read by an op other than its DEQUANTIZE"
        return candidate_layouts(weights.shape), True, ""
    codes = set()
    for op_index, slot in uses:
        op = graph.operators[op_index]
        code = builtin_code(model, op)
        if WEIGHT_INPUT.get(code) != slot:
            return [], False, f"also read by {builtin_name(code)} input {slot}"
        if weights.dtype == np.int8 and graph.tensors[op.inputs[0]].type != schema.TensorType.INT8 and not sparse_dynamic_range:
            return [], False, (f"dynamic-range {builtin_name(code)} stays dense (XNNPACK does not delegate it fed by "
                               "DENSIFY, docs/upstream/xnnpack_hybrid_conv_densify.md)")
        codes.add(code)
    if weights.dtype == np.float32 or schema.BuiltinOperator.FULLY_CONNECTED not in codes:
        return candidate_layouts(weights.shape), True, ""
    if len(codes) > 1:
        return [], False, "shared by FULLY_CONNECTED and another op"
    if not sparse_int8_fc:
        return [], False, "int8 FULLY_CONNECTED stays dense (see sparse_storage.py)"
    if weights.ndim != 2 or weights.shape[1] % 16:
        return [], False, "int8 FULLY_CONNECTED reads only 1x16 blocks; its input size is not a multiple of 16"
    return [Layout(16, (False, True, False))], False, ""


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
    dense.quantization = tensor.quantization  # per-channel scales: packed once (quantization_sharing)
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
