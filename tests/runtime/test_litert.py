"""LiteRTModel on XNNPACK / reference kernels: any batch size, int8 I/O, clear errors; evaluate and bench."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import tiny_mobilenet
from sparselite import LiteRTModel, SparseliteError, export_tflite
from sparselite.runtime.bench import Latency, interleaved_benchmark


@pytest.fixture(scope="module")
def files(tmp_path_factory, fmnist_train):
    """The same calibrated tiny model as float-I/O and int8-I/O files, plus a batch-4 float-I/O file."""
    folder = tmp_path_factory.mktemp("runtime")
    torch.manual_seed(0)
    model = tiny_mobilenet().eval()
    calibration = [fmnist_train[0][:64]]
    paths = {"float": folder / "float_io.tflite", "int8": folder / "int8_io.tflite", "batch4": folder / "batch4.tflite"}
    export_tflite(model, torch.zeros(1, 1, 28, 28), paths["float"], calibration_data=calibration)
    export_tflite(model, torch.zeros(1, 1, 28, 28), paths["int8"], calibration_data=calibration, io_dtype="int8")
    export_tflite(model, torch.zeros(4, 1, 28, 28), paths["batch4"], calibration_data=calibration)
    return paths


@pytest.fixture(scope="module")
def images(fmnist_train) -> np.ndarray:
    return fmnist_train[0][:32].numpy()


@pytest.mark.parametrize("accelerator", ["xnnpack", "reference"])
def test_any_batch_size_on_a_batch_1_model(files, images, accelerator):
    model = LiteRTModel(files["float"], accelerator=accelerator)
    assert model.batch_size == 1 and model.input_shape == (1, 1, 28, 28) and model.output_shape == (1, 10)
    one_by_one = np.concatenate([model(images[i : i + 1]) for i in range(7)])
    for batch in (1, 7, 32):
        out = model(images[:batch])
        assert out.shape == (batch, 10) and out.dtype == np.float32
        assert np.array_equal(out[: min(batch, 7)], one_by_one[: min(batch, 7)])
    assert not np.array_equal(one_by_one[0], one_by_one[1])  # really different images, not a repeated slice


def test_batch_4_model_loops_over_multiples_and_rejects_the_rest(files, images):
    model = LiteRTModel(files["batch4"])
    assert model.batch_size == 4
    out = model(images[:8])
    assert out.shape == (8, 10)
    assert np.array_equal(out, np.concatenate([model.run_raw(images[:4]), model.run_raw(images[4:8])]))
    single = LiteRTModel(files["float"])
    assert np.abs(out - single(images[:8])).max() < 0.01  # same weights; ranges may differ by an LSB
    with pytest.raises(SparseliteError, match="batch of 6 is not a multiple of the model's batch size 4"):
        model(images[:6])


def test_wrong_input_shape_is_an_error(files):
    with pytest.raises(SparseliteError, match="does not match the model's"):
        LiteRTModel(files["float"])(np.zeros((2, 1, 32, 32), np.float32))


def test_int8_io_quantizes_inputs_and_dequantizes_outputs(files, images):
    float_io = LiteRTModel(files["float"])
    int8_io = LiteRTModel(files["int8"])
    assert float_io.input_dtype == np.float32 and float_io.output_dtype == np.float32
    assert int8_io.input_dtype == np.int8 and int8_io.output_dtype == np.int8
    (in_scale, in_zp), (out_scale, out_zp) = int8_io.input_quantization, int8_io.output_quantization
    assert in_scale > 0 and out_scale > 0
    # __call__ quantizes the float input exactly as the float-I/O model's QUANTIZE op does.
    x = images[:16]
    q = np.clip(np.round(x / in_scale) + in_zp, -128, 127).astype(np.int8)
    raw = int8_io.run_raw(q)
    assert raw.dtype == np.int8
    dequantized = (raw.astype(np.float32) - out_zp) * out_scale
    assert np.array_equal(int8_io(x), dequantized)
    assert np.abs(int8_io(x) - float_io(x)).max() <= out_scale + 1e-6
    assert int8_io(q).dtype == np.float32  # int8 input passes through unquantized
    assert np.array_equal(int8_io(q), dequantized)


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"not a flatbuffer at all" * 10, b'{"model": "json"}'],
                         ids=["empty", "zeros", "text", "json"])
def test_corrupt_or_non_tflite_file_is_a_sparselite_error(tmp_path, content):
    path = tmp_path / "bad.tflite"
    path.write_bytes(content)
    with pytest.raises(SparseliteError, match="re-export it") as info:
        LiteRTModel(path)
    assert str(path) in str(info.value)  # names the file


def test_truncated_file_is_a_sparselite_error(tmp_path, files):
    path = tmp_path / "truncated.tflite"
    path.write_bytes(files["float"].read_bytes()[:200])
    with pytest.raises(SparseliteError):
        LiteRTModel(path)


def test_missing_file_and_bad_arguments(tmp_path, files):
    with pytest.raises(SparseliteError, match="does not exist"):
        LiteRTModel(tmp_path / "missing.tflite")
    with pytest.raises(SparseliteError, match="accelerator='npu'"):
        LiteRTModel(files["float"], accelerator="npu")
    with pytest.raises(SparseliteError, match="threads=0"):
        LiteRTModel(files["float"], threads=0)


def test_evaluate_on_a_loader(files, fmnist_train):
    images, labels = fmnist_train[0][:96], fmnist_train[1][:96]
    model = LiteRTModel(files["float"])
    result = model.evaluate(DataLoader(TensorDataset(images, labels), batch_size=32))
    expected = float((model(images.numpy()).argmax(1) == labels.numpy()).mean())
    assert result == {"accuracy": pytest.approx(expected), "examples": 96}
    numpy_batches = [(images[:50].numpy(), labels[:50].numpy())]
    assert model.evaluate(numpy_batches)["examples"] == 50


def test_benchmark_returns_sane_fields(files):
    results = interleaved_benchmark({"float": str(files["float"])}, threads=1, warmup=2, rounds=2, runs_per_round=5)
    latency = results["float"]
    assert isinstance(latency, Latency)
    assert latency.accelerator == "xnnpack" and latency.threads == 1 and latency.runs == 10
    assert 0 < latency.median_ms <= latency.p90_ms and latency.load_ms > 0
    assert set(latency.to_dict()) == {"accelerator", "threads", "runs", "median_ms", "p90_ms", "load_ms"}
    int8 = interleaved_benchmark({"int8": str(files["int8"])}, accelerator="reference", warmup=1, rounds=1, runs_per_round=3)["int8"]
    assert int8.accelerator == "reference" and int8.runs == 3 and int8.median_ms > 0  # int8 random inputs


def test_interleaved_benchmark(files):
    results = interleaved_benchmark({"a": str(files["float"]), "b": str(files["int8"])}, warmup=1, rounds=2, runs_per_round=3)
    assert list(results) == ["a", "b"]
    assert all(r.runs == 6 and 0 < r.median_ms <= r.p90_ms for r in results.values())
