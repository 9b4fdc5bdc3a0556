"""``validate_model`` (run by every ``read_model``): the values that crash or hang LiteRT's C++ are refused
by name, quickly, and a real export passes."""

from __future__ import annotations

import time

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema

from sparselite.errors import SparseliteError
from sparselite.tflite.flatbuffer import builtin_code, read_model, write_model
from tflite_mutants import seed_model


@pytest.fixture(scope="module")
def seed() -> bytes:
    return seed_model()


def _sparse(model):
    return [t for t in model.subgraphs[0].tensors if t.sparsity is not None]


def _edited(seed: bytes, edit) -> bytes:
    model = read_model(seed)
    edit(model)
    return write_model(model)


def _set_dense_size(model):
    dim = next(d for t in _sparse(model) for d in t.sparsity.dimMetadata if d.format == schema.DimensionType.DENSE)
    dim.denseSize = 2**31 - 1


def _index_out_of_range(model):
    dim = next(d for t in _sparse(model) for d in t.sparsity.dimMetadata if d.arrayIndices is not None)
    values = np.array(dim.arrayIndices.values)
    values[0] = np.iinfo(values.dtype).max
    dim.arrayIndices.values = values


def _segments_past_indices(model):
    dim = next(d for t in _sparse(model) for d in t.sparsity.dimMetadata if d.arraySegments is not None)
    values = np.array(dim.arraySegments.values)
    values[-1] -= 1
    dim.arraySegments.values = values


def _op_input_past_tensors(model):
    graph = model.subgraphs[0]
    graph.operators[0].inputs = [len(graph.tensors) + 3] + [int(i) for i in graph.operators[0].inputs[1:]]


def _buffer_past_buffers(model):
    model.subgraphs[0].tensors[0].buffer = len(model.buffers)


def _opcode_past_codes(model):
    model.subgraphs[0].operators[0].opcodeIndex = len(model.operatorCodes)


def _huge_shape(model):
    tensor = model.subgraphs[0].tensors[model.subgraphs[0].inputs[0]]
    tensor.shape = [2**31 - 1] + [int(d) for d in tensor.shape[1:]]


def _zero_scale(model):
    tensor = next(t for t in model.subgraphs[0].tensors if t.quantization is not None and t.quantization.scale is not None
                  and len(t.quantization.scale))
    tensor.quantization.scale = [0.0] * len(tensor.quantization.scale)


def _conv_stride_zero(model):
    next(op for op in model.subgraphs[0].operators if isinstance(op.builtinOptions, schema.Conv2DOptionsT)).builtinOptions.strideW = 0


def _conv_reads_sparse(model):
    graph = model.subgraphs[0]
    densify = next(op for op in graph.operators if builtin_code(model, op) == schema.BuiltinOperator.DENSIFY)
    source, target = int(densify.inputs[0]), int(densify.outputs[0])
    for op in graph.operators:
        op.inputs = [source if int(i) == target else int(i) for i in op.inputs]


def _name_not_utf8(model):
    model.subgraphs[0].tensors[0].name = b"\xff\xfe"


@pytest.mark.parametrize("edit, message", [
    (_set_dense_size, "dense_size 2147483647"),
    (_index_out_of_range, "sparse index outside"),
    (_segments_past_indices, "array_segments"),
    (_op_input_past_tensors, "an input of op 0"),
    (_buffer_past_buffers, "the buffer of tensor 0"),
    (_opcode_past_codes, "the operator code of op 0"),
    (_huge_shape, "more than 1024 MiB"),
    (_zero_scale, "quantization scale"),
    (_conv_stride_zero, "strideW=0"),
    (_conv_reads_sparse, "reads sparse tensor"),
    (_name_not_utf8, "not UTF-8"),
])
def test_hostile_values_are_refused_by_name(seed, edit, message):
    data = _edited(seed, edit)
    start = time.perf_counter()
    with pytest.raises(SparseliteError, match=message) as caught:
        read_model(data)
    assert time.perf_counter() - start < 1.0
    assert "\n" not in str(caught.value) and "re-export it" in str(caught.value)


def test_a_real_sparse_export_passes(seed):
    model = read_model(seed)
    assert _sparse(model)  # the seed exercises the sparse checks


def test_root_offset_outside_the_file_is_refused(seed):
    with pytest.raises(SparseliteError, match="root offset"):
        read_model((2**31).to_bytes(4, "little") + seed[4:])
