"""`inspect_tflite`: what a user sees about a dense or sparse-encoded file, and a clear error otherwise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import pt2e_int8_tflite
from sparselite.errors import SparseliteError
from sparselite.tflite.flatbuffer import read_model, write_model
from sparselite.export.sparse_storage import encode_sparse
from sparselite.tflite.constant_values import tensor_values, weight_sparsity, weight_tensors
from sparselite.inspect import inspect_tflite, precision_summary


def _prune_unstructured(data: bytes, sparsity: float = 0.8) -> bytes:
    model = read_model(data)
    graph = model.subgraphs[0]
    for tensor_index, _ in list(weight_tensors(model, graph)):
        tensor = graph.tensors[tensor_index]
        weights = tensor_values(model, tensor).copy()
        flat = weights.reshape(-1)
        flat[np.argsort(np.abs(flat.astype(np.int32)), kind="stable")[: int(sparsity * flat.size)]] = 0
        model.buffers[tensor.buffer].data = flat.view(np.uint8)
    return write_model(model)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU6(),
        nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.ReLU6(),
        nn.Conv2d(64, 128, 1), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )
    dense = _prune_unstructured(pt2e_int8_tflite(model, torch.randn(1, 3, 8, 8)))
    sparse, _ = encode_sparse(dense)
    folder = tmp_path_factory.mktemp("inspect")
    (folder / "dense.tflite").write_bytes(dense)
    (folder / "sparse.tflite").write_bytes(sparse)
    return folder / "dense.tflite", folder / "sparse.tflite"


def test_reports_sparsity_and_encoding_of_every_weight(files):
    dense_path, sparse_path = files
    dense, sparse = inspect_tflite(dense_path), inspect_tflite(sparse_path)
    expected = weight_sparsity(dense_path)
    for report in (dense, sparse):
        rows = {t.name: t for t in report.tensors}
        for name, sparsity in expected.items():
            assert rows[name].sparsity == pytest.approx(sparsity)
            assert rows[name].dtype == "int8"
    sparse_rows = {t.name: t for t in sparse.tensors}
    encoded = [t for t in sparse.tensors if t.encoding != "dense"]
    assert encoded and all(t.op.startswith("DENSIFY>") and t.stored_bytes < t.dense_bytes for t in encoded)
    assert all(t.encoding == "dense" and t.stored_bytes == t.dense_bytes for t in dense.tensors)
    assert sparse_rows[encoded[0].name].dense_bytes == {t.name: t for t in dense.tensors}[encoded[0].name].dense_bytes
    assert sparse.constant_bytes < dense.constant_bytes == sparse.dense_constant_bytes
    fc = [t for t in sparse.tensors if t.op == "FULLY_CONNECTED" and t.dtype == "int8"]
    assert fc and fc[0].encoding == "dense"


def test_reports_ops_taken_by_xnnpack_and_compressed_sizes(files):
    dense_path, sparse_path = files
    dense, sparse = inspect_tflite(dense_path), inspect_tflite(sparse_path)
    assert dense.xnnpack_error is None and sparse.xnnpack_error is None
    assert [op.op for op in sparse.ops].count("DENSIFY") == len([t for t in sparse.tensors if t.encoding != "dense"])
    # Every op of this int8 CNN, DENSIFY included, is taken by XNNPACK.
    assert all(op.xnnpack for op in dense.ops + sparse.ops)
    assert sparse.file_bytes == sparse_path.stat().st_size < dense.file_bytes
    assert 0 < sparse.xz_bytes < sparse.file_bytes
    try:
        import zstandard  # noqa: F401
    except ImportError:
        assert sparse.zstd_bytes is None
    else:
        assert 0 < sparse.zstd_bytes < sparse.file_bytes


def test_json_and_table(files):
    _, sparse_path = files
    report = inspect_tflite(sparse_path)
    data = json.loads(json.dumps(report.to_dict(), default=str))
    assert data["file_bytes"] == report.file_bytes
    assert len(data["tensors"]) == len(report.tensors) and len(data["ops"]) == len(report.ops)
    assert data["xnnpack_ops"] == len(report.ops)
    table = report.format_table()
    assert "DENSIFY>CONV_2D" in table and "csr" in table and "xz -9" in table
    assert f"XNNPACK takes {len(report.ops)}" in table


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, this is not a model", b"\x00\x00\x00\x00TFL3" + bytes(200)],
    ids=["empty", "text", "tfl3-garbage"],
)
def test_corrupt_file_raises_sparselite_error(tmp_path, content):
    path = tmp_path / "broken.tflite"
    path.write_bytes(content)
    with pytest.raises(SparseliteError):
        inspect_tflite(path)


def test_truncated_file_raises_sparselite_error(tmp_path, files):
    dense_path, _ = files
    path = tmp_path / "truncated.tflite"
    path.write_bytes(dense_path.read_bytes()[: dense_path.stat().st_size // 3])
    with pytest.raises(SparseliteError):
        inspect_tflite(path)


def test_missing_file_raises_sparselite_error(tmp_path):
    with pytest.raises(SparseliteError, match="does not exist"):
        inspect_tflite(tmp_path / "nope.tflite")


def test_each_op_says_what_it_computes_in(tmp_path):
    """int8 ops in the fully int8 file; per layer in a float-activation file: int8 weights read by a float
    input (dynamic_int8), fp16 weights behind their DEQUANTIZE, fp32."""
    from sparselite import export_tflite

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    path = tmp_path / "mixed.tflite"
    export_tflite(model, torch.randn(1, 16), path, precision={"default": "fp32", "0": "dynamic_int8", "2": "fp16"})
    layers = [op.precision for op in inspect_tflite(path).ops if op.op == "FULLY_CONNECTED"]
    assert layers == ["dynamic_int8", "fp16", "fp32"]
    assert "float16 weight unpacked" in [op.precision for op in inspect_tflite(path).ops if op.op == "DEQUANTIZE"]
    assert precision_summary(path) == "dynamic_int8 1, fp16 1, fp32 1"  # sparselite bench's column

    int8 = tmp_path / "int8.tflite"
    export_tflite(model, torch.randn(1, 16), int8, calibration_data=[torch.randn(32, 16)])
    ops = inspect_tflite(int8).ops
    assert {op.precision for op in ops if op.op == "FULLY_CONNECTED"} == {"int8"}
    assert [op.precision for op in ops if op.op in ("QUANTIZE", "DEQUANTIZE")] == ["float32->int8", "int8->float32"]
    assert precision_summary(int8) == "int8 3"
