"""fold_transposes_into_means: a mean over NCHW's spatial axes reads the NHWC value, without the TRANSPOSE."""

from __future__ import annotations

import numpy as np
import torch
from ai_edge_litert import schema_py_generated as schema
from torch import nn

from conftest import pt2e_int8_tflite
from sparselite.export.layout import _axes_before, fold_transposes_into_means
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
