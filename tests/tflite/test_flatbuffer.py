"""The file-format layer: read/write round trip, clear errors for bad files, op list and names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import pt2e_int8_tflite
from sparselite.errors import SparseliteError
from sparselite.tflite.flatbuffer import append_tensor, builtin_name, read_model, tensor_type_name, write_atomically, write_model
from sparselite.tflite.ops import op_list


@pytest.fixture(scope="module")
def int8_file() -> bytes:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    return pt2e_int8_tflite(model, torch.randn(1, 2, 6, 6))


def test_round_trip_keeps_the_model(int8_file):
    again = write_model(read_model(int8_file))
    assert [e.op for e in op_list(read_model(again))] == [e.op for e in op_list(read_model(int8_file))]


def test_op_list_names_ops_in_order(int8_file):
    ops = op_list(read_model(int8_file))
    assert [e.index for e in ops] == list(range(len(ops)))
    assert {"CONV_2D", "FULLY_CONNECTED"} <= {e.op for e in ops}
    assert all(e.outputs for e in ops)


def test_appended_tensors_get_names_the_subgraph_does_not_have(int8_file):
    model = read_model(int8_file)
    existing = model.subgraphs[0].tensors[0].name
    added = [append_tensor(model, [1], 0, name) for name in (b"shape", b"shape", existing, b"shape")]
    names = [t.name for t in model.subgraphs[0].tensors]
    assert len(set(names)) == len(names)  # ai-edge-quantizer refuses a file with a repeated tensor name
    assert [names[i] for i in added] == [b"shape", b"shape_1", existing + b"_1", b"shape_2"]


@pytest.mark.parametrize("data, message", [(b"not a model", "not a TFLite flatbuffer"),
                                           (b"\x1c\x00\x00\x00TFL3" + b"\xff" * 64, "corrupt")])
def test_bad_bytes_are_a_clear_error(data, message):
    with pytest.raises(SparseliteError, match=message):
        read_model(data)


def test_names():
    assert builtin_name(3) == "CONV_2D" and builtin_name(10_000) == "OP_10000"
    assert tensor_type_name(9) == "int8"


def test_write_atomically_replaces_the_whole_file(tmp_path):
    path = tmp_path / "sub" / "model.tflite"
    write_atomically(path, b"old contents")
    write_atomically(path, b"new")
    assert path.read_bytes() == b"new" and [p.name for p in path.parent.iterdir()] == ["model.tflite"]
