"""A seeded corpus of mutated .tflite files, for the fuzz test and ``benchmarks/robustness.py``.

The seed is a small real export (pt2e int8 through litert-torch, then sparselite's sparse pass: conv
weights behind DENSIFY, and a 1x16-block sparse FULLY_CONNECTED), so every structure sparselite reads
is present to be corrupted. Mutations come in classes a user's broken or hostile file falls into:

- ``bitflip``: 1-8 random bits flipped anywhere;
- ``overwrite``: a 4-byte aligned word set to a hostile value (0, -1, 2^31-1, a huge offset), which
  sends a table or vector offset out of bounds;
- ``truncate``: cut at a random length, zero-length included;
- ``garbage``: not a flatbuffer at all (random bytes, text, a file with only the 'TFL3' identifier);
- ``semantic``: a well-formed flatbuffer with a wrong value in it (index out of range, huge or
  negative shape, ``dense_size`` 2^31-1, sparse indices out of range, a zero scale, stride 0, ...).

``mutants(seed_bytes, n, seed)`` is deterministic for a given seed file.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

CLASSES = ("bitflip", "overwrite", "truncate", "garbage", "semantic")
HOSTILE_WORDS = (0, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0x00FFFFFF, 0x10000, 1, 0xFFFFFFF0)


@dataclass(frozen=True)
class Mutant:
    name: str  # class/detail, e.g. "semantic/dense_size_huge"
    data: bytes

    @property
    def kind(self) -> str:
        return self.name.split("/")[0]


def seed_model() -> bytes:
    """A tiny conv net exported to int8, pruned, and re-encoded sparse (conv via DENSIFY, FC 1x16)."""
    import torch
    from torch import nn

    from conftest import pt2e_int8_tflite
    from sparselite.export.sparse_storage import encode_sparse
    from sparselite.tflite.flatbuffer import read_model, write_model
    from sparselite.tflite.constant_values import tensor_values, weight_tensors

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                        nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32))
    dense = pt2e_int8_tflite(net, torch.randn(1, 1, 8, 8), torch.randn(4, 1, 8, 8))
    model = read_model(dense)
    graph = model.subgraphs[0]
    for tensor_index, _ in list(weight_tensors(model, graph)):
        tensor = graph.tensors[tensor_index]
        weights = tensor_values(model, tensor).copy()
        if weights.ndim == 2:  # FC: keep whole 1x16 blocks, the only int8 sparse FC format
            blocks = weights.reshape(weights.shape[0], -1, 16)
            blocks[::2] = 0
        else:
            flat = weights.reshape(-1)
            flat[np.argsort(np.abs(flat.astype(np.int32)), kind="stable")[: int(0.8 * flat.size)]] = 0
        model.buffers[tensor.buffer].data = weights.reshape(-1).view(np.uint8)
    sparse, _ = encode_sparse(write_model(model), sparse_int8_fc=True)
    return sparse


def mutants(seed_bytes: bytes, n: int, seed: int = 0) -> list[Mutant]:
    """``n`` mutants of ``seed_bytes``, spread evenly over ``CLASSES``, reproducible from ``seed``."""
    rng = random.Random(seed)
    makers: dict[str, Callable[[bytes, random.Random], Mutant]] = {
        "bitflip": _bitflip, "overwrite": _overwrite, "truncate": _truncate, "garbage": _garbage,
        "semantic": _semantic,
    }
    out = []
    for i in range(n):
        out.append(makers[CLASSES[i % len(CLASSES)]](seed_bytes, rng))
    return out


def _bitflip(data: bytes, rng: random.Random) -> Mutant:
    buf = bytearray(data)
    flips = rng.randint(1, 8)
    for _ in range(flips):
        bit = rng.randrange(8, len(buf) * 8)  # keep the root offset and 'TFL3' so the reader gets past them
        buf[bit // 8] ^= 1 << (bit % 8)
    return Mutant(f"bitflip/{flips}", bytes(buf))


def _overwrite(data: bytes, rng: random.Random) -> Mutant:
    buf = bytearray(data)
    offset = rng.randrange(8, len(buf) - 4) & ~3
    word = rng.choice(HOSTILE_WORDS)
    struct.pack_into("<I", buf, offset, word)
    return Mutant(f"overwrite/{word:#x}", bytes(buf))


def _truncate(data: bytes, rng: random.Random) -> Mutant:
    size = rng.choice([0, 1, 4, 8, 12, rng.randrange(len(data)), rng.randrange(len(data) // 2, len(data))])
    return Mutant(f"truncate/{size}", data[:size])


def _garbage(data: bytes, rng: random.Random) -> Mutant:
    choice = rng.randrange(4)
    if choice == 0:
        return Mutant("garbage/random", bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4096))))
    if choice == 1:
        return Mutant("garbage/identifier_only", b"\x00\x00\x00\x00TFL3" + bytes(rng.randint(0, 64)))
    if choice == 2:
        return Mutant("garbage/text", b"model:\n  layers: 3\n" * rng.randint(1, 50))
    root = rng.choice([0x7FFFFFF0, 0xFFFFFFF0, len(data) + 16])
    return Mutant(f"garbage/root_offset_{root:#x}", struct.pack("<I", root) + data[4:])


def _semantic(data: bytes, rng: random.Random) -> Mutant:
    from sparselite.tflite.flatbuffer import read_model, write_model

    model = read_model(data)
    edit = rng.choice(sorted(SEMANTIC_EDITS))
    SEMANTIC_EDITS[edit](model, rng)
    return Mutant(f"semantic/{edit}", write_model(model))


# --- semantic edits: each takes the object API model and breaks one thing in it ---

def _graph(model):
    return model.subgraphs[0]


def _sparse_tensors(model):
    return [t for t in _graph(model).tensors if t.sparsity is not None]


def csr_levels(model):
    return [dim for t in _sparse_tensors(model) for dim in t.sparsity.dimMetadata if dim.arrayIndices is not None]


def _replace_one(values, rng: random.Random, choices: list[int]) -> list[int]:
    """A copy of an int vector (the object API's arrays are read-only) with one entry replaced."""
    values = [int(v) for v in values]
    values[rng.randrange(len(values))] = rng.choice(choices)
    return values


def set_vector(vector, values: list[int]) -> None:
    dtype = np.asarray(vector.values).dtype if vector.values is not None else np.dtype(np.int32)
    limits = np.iinfo(dtype)
    vector.values = np.asarray([min(max(v, limits.min), limits.max) for v in values], dtype=dtype)


def _edit_op_input_out_of_range(model, rng):
    op = rng.choice(_graph(model).operators)
    op.inputs = _replace_one(op.inputs, rng, [len(_graph(model).tensors) + 5, 2**31 - 1, -7])


def _edit_op_output_out_of_range(model, rng):
    op = rng.choice(_graph(model).operators)
    op.outputs = _replace_one(op.outputs, rng, [len(_graph(model).tensors), 10**6, -2])


def _edit_graph_io_out_of_range(model, rng):
    graph = _graph(model)
    if rng.random() < 0.5:
        graph.inputs = _replace_one(graph.inputs, rng, [len(graph.tensors), 2**31 - 1, -2])
    else:
        graph.outputs = _replace_one(graph.outputs, rng, [len(graph.tensors), 2**31 - 1, -2])


def _edit_opcode_index_out_of_range(model, rng):
    rng.choice(_graph(model).operators).opcodeIndex = rng.choice([len(model.operatorCodes), 2**31 - 1])


def _edit_unknown_builtin(model, rng):
    code = rng.choice(model.operatorCodes)
    code.builtinCode = rng.choice([10_000, 2**31 - 1])
    code.deprecatedBuiltinCode = 127


def _edit_buffer_index_out_of_range(model, rng):
    rng.choice(_graph(model).tensors).buffer = rng.choice([len(model.buffers), 2**31 - 1])


def _edit_huge_shape(model, rng):
    tensor = rng.choice(_graph(model).tensors)
    if tensor.shape is not None and len(tensor.shape):
        tensor.shape = _replace_one(tensor.shape, rng, [2**31 - 1, 1 << 20, 65536])


def _edit_negative_shape(model, rng):
    tensor = rng.choice(_graph(model).tensors)
    if tensor.shape is not None and len(tensor.shape):
        tensor.shape = _replace_one(tensor.shape, rng, [-1, -5, -(2**31)])


def _edit_input_shape_huge(model, rng):
    graph = _graph(model)
    tensor = graph.tensors[graph.inputs[0]]
    tensor.shape = [rng.choice([2**31 - 1, 1 << 24, 4096])] + [int(d) for d in tensor.shape[1:]]


def _edit_dense_size_huge(model, rng):
    dims = [d for t in _sparse_tensors(model) for d in t.sparsity.dimMetadata if d.arrayIndices is None]
    rng.choice(dims).denseSize = rng.choice([2**31 - 1, 1 << 20, 0])


def _edit_sparse_index_out_of_range(model, rng):
    dim = rng.choice(csr_levels(model))
    values = [int(v) for v in dim.arrayIndices.values]
    if values:
        values[rng.randrange(len(values))] = int(np.iinfo(np.asarray(dim.arrayIndices.values).dtype).max)
    set_vector(dim.arrayIndices, values)


def _edit_sparse_segments_broken(model, rng):
    dim = rng.choice(csr_levels(model))
    values = [int(v) for v in dim.arraySegments.values]
    choice = rng.randrange(3)
    if choice == 0:
        values[-1] = values[-1] + 1000
    elif choice == 1:
        values.reverse()
    else:
        values = values[:-1]
    set_vector(dim.arraySegments, values)


def _edit_traversal_order_broken(model, rng):
    sparsity = rng.choice(_sparse_tensors(model)).sparsity
    order = [int(t) for t in sparsity.traversalOrder]
    order[rng.randrange(len(order))] = rng.choice([len(order) + 3, -1, order[0]])
    sparsity.traversalOrder = order


def _edit_block_map_broken(model, rng):
    tensors = [t for t in _sparse_tensors(model) if t.sparsity.blockMap is not None and len(t.sparsity.blockMap)]
    sparsity = rng.choice(tensors or _sparse_tensors(model)).sparsity
    sparsity.blockMap = [rng.choice([7, -1, 100])]


def _edit_sparse_values_truncated(model, rng):
    tensor = rng.choice(_sparse_tensors(model))
    buffer = model.buffers[tensor.buffer]
    buffer.data = np.asarray(buffer.data)[: max(len(buffer.data) // 2, 1)]


def _edit_dense_buffer_truncated(model, rng):
    graph = _graph(model)
    constants = [t for t in graph.tensors if t.sparsity is None and model.buffers[t.buffer].data is not None
                 and len(model.buffers[t.buffer].data) > 1]
    buffer = model.buffers[rng.choice(constants).buffer]
    buffer.data = np.asarray(buffer.data)[: len(buffer.data) // 2]


def _edit_sparse_on_conv(model, rng):
    """Point a CONV_2D straight at a sparse tensor (skipping its DENSIFY): the kernel would read the
    compressed buffer as dense."""
    graph = _graph(model)
    from sparselite.tflite.flatbuffer import builtin_code
    from ai_edge_litert import schema_py_generated as schema

    for op in graph.operators:
        if builtin_code(model, op) == schema.BuiltinOperator.DENSIFY:
            source, target = int(op.inputs[0]), int(op.outputs[0])
            for other in graph.operators:
                other.inputs = [source if int(i) == target else int(i) for i in other.inputs]
            return


def _edit_quant_scale_bad(model, rng):
    tensors = [t for t in _graph(model).tensors if t.quantization is not None and t.quantization.scale is not None
               and len(t.quantization.scale)]
    quant = rng.choice(tensors).quantization
    scale = [float(s) for s in quant.scale]
    scale[rng.randrange(len(scale))] = rng.choice([0.0, float("nan"), float("inf"), -1.0])
    quant.scale = scale


def _edit_quant_dimension_bad(model, rng):
    tensors = [t for t in _graph(model).tensors if t.quantization is not None and t.quantization.scale is not None
               and len(t.quantization.scale) > 1]
    rng.choice(tensors).quantization.quantizedDimension = rng.choice([7, 2**31 - 1, -1])


def _edit_quant_lengths_mismatch(model, rng):
    tensors = [t for t in _graph(model).tensors if t.quantization is not None and t.quantization.scale is not None
               and len(t.quantization.scale) > 1]
    quant = rng.choice(tensors).quantization
    quant.scale = [float(s) for s in quant.scale][:-1]


def _edit_conv_stride_zero(model, rng):
    from ai_edge_litert import schema_py_generated as schema

    convs = [op for op in _graph(model).operators if isinstance(op.builtinOptions, schema.Conv2DOptionsT)]
    options = rng.choice(convs).builtinOptions
    setattr(options, rng.choice(["strideW", "strideH", "dilationWFactor", "dilationHFactor"]), rng.choice([0, -1]))


def _edit_tensor_type_unknown(model, rng):
    rng.choice(_graph(model).tensors).type = rng.choice([99, 127])


def _edit_buffer_offset_out_of_file(model, rng):
    buffer = model.buffers[rng.choice([t.buffer for t in _graph(model).tensors if t.buffer])]
    buffer.data, buffer.offset, buffer.size = None, rng.choice([2**40, 10**6, 12]), rng.choice([2**32, 10**6, 64])


def _edit_op_inputs_dropped(model, rng):
    op = rng.choice(_graph(model).operators)
    op.inputs = list(op.inputs)[:1] if rng.random() < 0.5 else []


def _edit_fc_op_version(model, rng):
    from ai_edge_litert import schema_py_generated as schema

    for code in model.operatorCodes:
        if max(code.builtinCode, code.deprecatedBuiltinCode) == schema.BuiltinOperator.FULLY_CONNECTED:
            code.version = rng.choice([8, 12, 13, 1000])


def _edit_reshape_bad(model, rng):
    from ai_edge_litert import schema_py_generated as schema

    for op in _graph(model).operators:
        if isinstance(op.builtinOptions, schema.ReshapeOptionsT):
            op.builtinOptions.newShape = [rng.choice([-1, 0, 2**31 - 1]), -1]


def _edit_weight_input_absent(model, rng):
    """A conv's or FC's weight input set to -1 (an absent optional input): XNNPACK indexes the tensor
    array with it at allocate_tensors (a segfault) unless the file is refused first."""
    from sparselite.tflite.flatbuffer import WEIGHT_INPUT, builtin_code

    ops = [op for op in _graph(model).operators if builtin_code(model, op) in WEIGHT_INPUT]
    op = rng.choice(ops)
    inputs = [int(i) for i in op.inputs]
    inputs[WEIGHT_INPUT[builtin_code(model, op)]] = -1
    op.inputs = inputs


def _edit_required_input_absent(model, rng):
    """Any op's first input set to -1 (absent)."""
    op = rng.choice(_graph(model).operators)
    op.inputs = [-1] + [int(i) for i in op.inputs][1:]


SEMANTIC_EDITS: dict[str, Callable] = {
    name[len("_edit_"):]: fn for name, fn in list(globals().items()) if name.startswith("_edit_")
}


def iter_classes(corpus: list[Mutant]) -> Iterator[tuple[str, list[Mutant]]]:
    """(class, its mutants) in ``CLASSES`` order."""
    for kind in CLASSES:
        yield kind, [m for m in corpus if m.kind == kind]
