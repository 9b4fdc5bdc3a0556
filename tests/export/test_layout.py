"""The file forms XNNPACK runs: a mean over NCHW's spatial axes reads the NHWC value (no TRANSPOSE), nearest
upsampling as copies and DEPTH_TO_SPACE, a transposed conv's activation fused into it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ai_edge_litert import schema_py_generated as schema
from torch import nn

from conftest import pt2e_int8_tflite, xnnpack_partitions
from sparselite.export.layout import (
    _axes_before, fold_transposes_into_means, fuse_activations_into_transpose_convs, nearest_upsampling_as_depth_to_space,
    split_wide_concatenations,
)
from sparselite.export.tflite import _quantize_and_convert, float_model_for_export
from sparselite.runtime.litert import LiteRTModel
from sparselite.tflite.flatbuffer import builtin_code, read_model, write_model


class _MeanHead(nn.Module):
    """ShuffleNet's head: a conv, then ``x.mean((2, 3))`` written against NCHW."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _transposes(model_t) -> int:
    return sum(builtin_code(model_t, op) == schema.BuiltinOperator.TRANSPOSE for op in model_t.subgraphs[0].operators)


def test_the_mean_reads_the_nhwc_value_and_computes_the_same_integers(tmp_path):
    torch.manual_seed(0)
    calibration = torch.randn(16, 3, 8, 8)
    raw = pt2e_int8_tflite(_MeanHead(), calibration[:1], calibration)
    model_t = read_model(raw)
    before = _transposes(model_t)
    assert fold_transposes_into_means(model_t) == 1
    assert _transposes(model_t) == before - 1
    mean = next(op for op in model_t.subgraphs[0].operators if builtin_code(model_t, op) == schema.BuiltinOperator.MEAN)
    axes = model_t.buffers[model_t.subgraphs[0].tensors[mean.inputs[1]].buffer].data
    assert np.asarray(axes, dtype=np.uint8).view(np.int32).tolist() == [1, 2]  # NHWC's spatial axes

    (tmp_path / "raw.tflite").write_bytes(raw)
    (tmp_path / "folded.tflite").write_bytes(write_model(model_t))
    raw_model, folded = LiteRTModel(tmp_path / "raw.tflite"), LiteRTModel(tmp_path / "folded.tflite")
    x = np.random.default_rng(0).integers(-128, 128, (8, 3, 8, 8)).astype(np.int8)
    np.testing.assert_array_equal(raw_model(x), folded(x))


def test_a_mean_whose_kept_axes_the_transpose_reorders_keeps_its_transpose():
    assert _axes_before(np.array([0, 3, 1, 2]), np.array([2, 3])).tolist() == [1, 2]
    assert _axes_before(np.array([0, 3, 1, 2]), np.array([-1, -2])).tolist() == [1, 2]
    # Kept axes H and W come out as (W, H): the mean of the untransposed value would be laid out differently.
    assert _axes_before(np.array([0, 2, 1, 3]), np.array([3])) is None


class _Upsampling(nn.Module):
    """An FPN's top-down path: nearest upsampling by 2 and by 3, each added to a finer map."""

    def __init__(self) -> None:
        super().__init__()
        self.fine, self.coarse, self.coarsest = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fine = torch.relu(self.fine(x))
        coarse = torch.relu(self.coarse(fine))
        up = nn.functional.interpolate(self.coarsest(coarse), scale_factor=3.0, mode="nearest")
        return fine + nn.functional.interpolate(coarse + up, scale_factor=2.0, mode="nearest")


def _count(model_t, code: int) -> int:
    return sum(builtin_code(model_t, op) == code for op in model_t.subgraphs[0].operators)


def _int8_file(model: nn.Module, calibration: torch.Tensor, ranges: dict | None = None):
    return _quantize_and_convert(float_model_for_export(model), (calibration[:1],), ranges or {}, [calibration])[0]


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_nearest_upsampling_becomes_copies_and_depth_to_space_with_the_same_values(precision, tmp_path):
    import litert_torch

    torch.manual_seed(0)
    x = torch.randn(8, 3, 12, 12)
    model = _Upsampling().eval()
    model_t = _int8_file(model, x) if precision == "int8" else read_model(litert_torch.convert(model, (x[:1],)).model_content())
    (tmp_path / "raw.tflite").write_bytes(write_model(model_t))
    assert _count(model_t, schema.BuiltinOperator.RESIZE_NEAREST_NEIGHBOR) == 2
    assert xnnpack_partitions(tmp_path / "raw.tflite") > 1  # XNNPACK does not take RESIZE_NEAREST_NEIGHBOR

    assert nearest_upsampling_as_depth_to_space(model_t) == 2
    split_wide_concatenations(model_t)  # the 9 copies of the 3x upsampling: XNNPACK concatenates 5 at most
    assert _count(model_t, schema.BuiltinOperator.RESIZE_NEAREST_NEIGHBOR) == 0
    assert _count(model_t, schema.BuiltinOperator.DEPTH_TO_SPACE) == 2
    (tmp_path / "rewritten.tflite").write_bytes(write_model(model_t))
    assert xnnpack_partitions(tmp_path / "rewritten.tflite") == 1
    raw, rewritten = LiteRTModel(tmp_path / "raw.tflite"), LiteRTModel(tmp_path / "rewritten.tflite")
    np.testing.assert_array_equal(raw(x.numpy()), rewritten(x.numpy()))


def test_a_transposed_convs_activation_is_fused_into_it(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 4, 6, 6)
    model = nn.Sequential(nn.ConvTranspose2d(4, 8, 2, 2), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    # Ranges as QAT learns them: the transposed conv's (its chain's, after the ReLU) is the ReLU's too.
    model_t = _int8_file(model, x, {"": (-4.0, 4.0), "0": (0.0, 3.0), "2": (-3.0, 3.0)})
    (tmp_path / "raw.tflite").write_bytes(write_model(model_t))
    assert _count(model_t, schema.BuiltinOperator.RELU) == 1  # litert-torch's int8 conversion leaves it standalone

    assert fuse_activations_into_transpose_convs(model_t) == 1
    assert _count(model_t, schema.BuiltinOperator.RELU) == 0
    transposed = next(op for op in model_t.subgraphs[0].operators if builtin_code(model_t, op) == schema.BuiltinOperator.TRANSPOSE_CONV)
    assert transposed.builtinOptions.fusedActivationFunction == schema.ActivationFunctionType.RELU
    (tmp_path / "fused.tflite").write_bytes(write_model(model_t))
    raw, fused = LiteRTModel(tmp_path / "raw.tflite"), LiteRTModel(tmp_path / "fused.tflite")
    np.testing.assert_array_equal(raw(x.numpy()), fused(x.numpy()))  # the ReLU kept its input's grid here
