"""The report's notes on int8 ops XNNPACK leaves to TFLite's own kernels, read from the real runtime."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model_blocks import DenseBlock, conv_bn
from sparselite import export_tflite
from sparselite.export.islands import int8_ops_xnnpack_leaves_out
from sparselite.export.conversion import convert_with_ranges, float_model_for_export
from sparselite.tflite.flatbuffer import builtin_code, builtin_name, read_model


class ClampToTwo(nn.Module):
    """A clamp whose bounds no fused activation has: an int8 MINIMUM in the file, which XNNPACK
    (ai-edge-litert 2.3) does not delegate."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 8, 3, 2)
        self.branch = conv_bn(8, 8, 3, act=None)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(torch.clamp(x + self.branch(x), 0.0, 2.0).mean((2, 3)))


def test_strict_export_notes_the_int8_ops_xnnpack_leaves_out(fmnist_train, tmp_path):
    model = ClampToTwo().eval()
    images = fmnist_train[0][:64]
    report = export_tflite(model, images[:1], tmp_path / "m.tflite", calibration_data=[images], verify_data=[images])
    file = read_model(tmp_path / "m.tflite")
    ops = {builtin_name(builtin_code(file, op)) for op in file.subgraphs[0].operators}
    assert "MINIMUM" in ops and report.float_islands == []
    assert any("XNNPACK leaves these int8 ops to TFLite's kernels" in note and "MINIMUM (the top-level forward)" in note
               for note in report.notes), report.notes


def test_a_concatenation_export_splits_for_xnnpack_is_not_reported_left_out(fmnist_train):
    """DenseNet's 7-input concatenation is split into XNNPACK's 5-input form when the file is written,
    so the check reads the file in that form (it used to report 'CONCATENATION (block)')."""
    model = nn.Sequential(conv_bn(1, 8, 3, 2), DenseBlock(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    images = fmnist_train[0][:32]
    float_model = float_model_for_export(model)
    model_t, _ = convert_with_ranges(float_model, (images[:1],), {}, [images], frozenset())
    assert any(len(op.inputs) > 5 for op in model_t.subgraphs[0].operators)  # the converter's one wide concatenation
    assert int8_ops_xnnpack_leaves_out(model_t, float_model) == []


class _NoInt8Forms(nn.Module):
    """Mish and GroupNorm: torch ops the quantizer has no int8 form for."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2), nn.BatchNorm2d(8), nn.Mish())
        self.norm = nn.Sequential(nn.Conv2d(8, 8, 3), nn.GroupNorm(2, 8))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.stem(x)).mean((2, 3)))


def test_strict_export_names_ops_with_no_int8_form_before_asking_for_calibration(fmnist_train, tmp_path):
    """Their missing ranges would be calibrated for nothing: the strict export fails on them anyway."""
    from sparselite.errors import SparseliteError
    from sparselite.quantization.qat import QuantizationSimulator

    images = fmnist_train[0][:32]
    model = _NoInt8Forms()
    simulator = QuantizationSimulator(begin_step=0)
    simulator.prepare(model, (images[:1],))
    model.train()
    simulator.step(0)
    model(images)  # QAT learns every range it has a point for
    model.eval()
    with pytest.raises(SparseliteError) as strict:
        export_tflite(model, images[:1], tmp_path / "m.tflite")
    message = str(strict.value)
    assert message.startswith("2 op type(s) have no int8 form: group_norm (norm.1); mish (stem.2).")
    assert "float_fallback=True" in message and not (tmp_path / "m.tflite").exists()
    with pytest.raises(SparseliteError, match="not learned in QAT .* pass calibration"):  # what the mixed file needs
        export_tflite(model, images[:1], tmp_path / "m.tflite", float_fallback=True)
