"""quantize_pt2e: every activation observer takes the range learned in training at its source point."""

from __future__ import annotations

import torch
from torch import nn
from torchao.quantization.pt2e.observer import ObserverBase

from sparselite.export.ranges import quantize_pt2e


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.act(self.conv(x)), 1), 1))


def test_learned_ranges_reach_input_conv_and_linear_observers():
    torch.manual_seed(0)
    ranges = {"": (-2.0, 2.0), "conv": (0.0, 6.0), "fc": (-4.0, 3.0)}
    example = (torch.randn(1, 1, 6, 6),)
    _, _, injection = quantize_pt2e(ConvNet().eval(), example, ranges)
    assert set(injection.learned.values()) == {"<input>", "conv", "fc"}
    assert injection.calibrated == {}


def test_points_without_a_learned_range_keep_the_calibrated_one():
    torch.manual_seed(0)
    example = (torch.randn(1, 1, 6, 6),)
    calibration = [torch.randn(4, 1, 6, 6)]
    prepared_ranges = {"conv": (0.0, 6.0)}
    converted, _, injection = quantize_pt2e(ConvNet().eval(), example, prepared_ranges, calibration)
    assert set(injection.learned.values()) == {"conv"}
    assert injection.calibrated  # the input and the classifier output
    assert not any(isinstance(m, ObserverBase) for m in converted.modules())  # converted to Q/DQ


def test_functional_ops_and_hardsigmoid_insides_take_learned_or_derived_ranges():
    """A residual add and a squeeze-excite multiply get the ranges their call sites learned in training;
    the inside of the decomposed hardsigmoid (x + 3, its clamp, * 1/6) follows by interval arithmetic."""
    from model_blocks import BasicResidual, BlockNet, SqueezeExcite
    from sparselite.export.conversion import float_model_for_export
    from sparselite.quantization.qat import QuantizationSimulator, learned_ranges

    torch.manual_seed(0)
    model = BlockNet(nn.Sequential(BasicResidual(8), SqueezeExcite(8)), 8)
    x = torch.randn(16, 1, 12, 12)
    QuantizationSimulator().prepare(model, (x[:1],))
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    ranges = learned_ranges(model)
    assert {"sparselite_op_quant.block/0/add_0", "sparselite_op_quant.block/1/mul_0", "block.1.gate"} <= set(ranges)
    _, _, injection = quantize_pt2e(float_model_for_export(model), (x[:1],), ranges)
    assert injection.calibrated == {}
    assert {"sparselite_op_quant.block/0/add_0", "sparselite_op_quant.block/1/mul_0"} <= set(injection.learned.values())
    assert any("fc2" in how and "add 3" in how for how in injection.derived.values())


def test_in_place_ops_take_ranges_like_their_out_of_place_forms():
    """``nn.Dropout(inplace=True)`` (torchvision's classifiers) stays in the eval graph as ``aten.dropout_``,
    ``nn.ReLU(inplace=True)`` as ``aten.relu_``, ``x += y`` as ``aten.add_``: each quantizes as its
    out-of-place kind, so no range is left to calibration."""
    from sparselite.export.conversion import float_model_for_export
    from sparselite.quantization.qat import QuantizationSimulator, learned_ranges

    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.relu, self.skip = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(1, 4, 1)
            self.fc = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(4, 3))

        def forward(self, x):
            y = self.relu(self.conv(x))
            y += self.skip(x)
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))

    torch.manual_seed(0)
    model, x = InPlace(), torch.randn(16, 1, 6, 6)
    QuantizationSimulator().prepare(model, (x[:1],))
    with torch.no_grad():
        model(x)
    model.eval()
    graph = torch.export.export(float_model_for_export(model), (x[:1],)).graph
    assert {"dropout_", "add_", "relu_"} <= {getattr(n.target, "__name__", "").split(".")[0] for n in graph.nodes}
    _, _, injection = quantize_pt2e(float_model_for_export(model), (x[:1],), learned_ranges(model))
    assert injection.calibrated == {}
