"""use_float_io: an int8-I/O model gets float32 inputs and outputs and computes the same logits."""

from __future__ import annotations

import numpy as np
import torch
from ai_edge_litert import schema_py_generated as schema
from torch import nn

from conftest import pt2e_int8_tflite
from sparselite.export.io import use_float_io
from sparselite.runtime.litert import LiteRTModel
from sparselite.tflite.flatbuffer import builtin_code, read_model, write_model


def test_float_io_wraps_int8_ends_and_keeps_the_logits(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    calibration = torch.randn(16, 1, 8, 8)
    int8_io = tmp_path / "int8_io.tflite"
    int8_io.write_bytes(pt2e_int8_tflite(model, calibration[:1], calibration))

    model_t = use_float_io(read_model(int8_io))
    graph = model_t.subgraphs[0]
    codes = [builtin_code(model_t, op) for op in graph.operators]
    assert codes[0] == schema.BuiltinOperator.QUANTIZE and codes[-1] == schema.BuiltinOperator.DEQUANTIZE
    assert all(graph.tensors[i].type == schema.TensorType.FLOAT32 for i in [*graph.inputs, *graph.outputs])
    signature = model_t.signatureDefs[0]
    assert signature.inputs[0].tensorIndex == graph.inputs[0] and signature.outputs[0].tensorIndex == graph.outputs[0]

    float_io = tmp_path / "float_io.tflite"
    float_io.write_bytes(write_model(model_t))
    x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
    reference, wrapped = LiteRTModel(int8_io), LiteRTModel(float_io)
    assert reference.input_dtype == np.int8 and wrapped.input_dtype == np.float32
    # In the graph or in numpy, the same int8 arithmetic: at most a rounding tie apart (one output step).
    assert np.abs(wrapped(x) - reference(x)).max() <= reference.output_quantization[0] * 1.001


def test_an_rgb_input_is_transposed_in_float_then_quantized_to_the_same_integers(tmp_path, monkeypatch):
    """XNNPACK transposes a 3-channel image faster in float than in int8 (module docstring): the
    QUANTIZE moves after the layout TRANSPOSE, and every output stays what it was."""
    from sparselite.export import io

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    calibration = torch.randn(16, 3, 8, 8)
    int8_io = pt2e_int8_tflite(model, calibration[:1], calibration)

    model_t = use_float_io(read_model(int8_io))
    graph = model_t.subgraphs[0]
    first, second = graph.operators[:2]
    assert [builtin_code(model_t, op) for op in (first, second)] == [schema.BuiltinOperator.TRANSPOSE, schema.BuiltinOperator.QUANTIZE]
    assert first.inputs[0] == graph.inputs[0] and graph.tensors[first.outputs[0]].type == schema.TensorType.FLOAT32
    monkeypatch.setattr(io, "_TRANSPOSE_IN_FLOAT_MAX_CHANNELS", 0)
    int8_first = use_float_io(read_model(int8_io))
    assert builtin_code(int8_first, int8_first.subgraphs[0].operators[0]) == schema.BuiltinOperator.QUANTIZE

    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    (tmp_path / "a.tflite").write_bytes(write_model(model_t))
    (tmp_path / "b.tflite").write_bytes(write_model(int8_first))
    np.testing.assert_array_equal(LiteRTModel(tmp_path / "a.tflite")(x), LiteRTModel(tmp_path / "b.tflite")(x))
