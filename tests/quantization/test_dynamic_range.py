"""XNNPACK's run-time rounding of a dynamic-range layer's input, against the runtime itself.

Each layer kind XNNPACK quantizes differently (a linear per token, a conv per image, a 1x1 conv per
pixel) is exported dynamic-range and run on XNNPACK; the torch simulation must give the file's outputs
to float rounding, and much closer than the weights alone do (so the rows are what makes it match).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from sparselite import export_tflite
from sparselite.export.precision import precision_reference
from sparselite.quantization.dynamic_range import fake_quantize_rows, row_dims_of
from sparselite.runtime.litert import LiteRTModel


class OneLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


# Inputs whose channels differ in scale: each row's range then differs from every other row's.
CASES = {
    "linear over tokens": (nn.Linear(64, 32), torch.randn(4, 5, 64) * torch.linspace(0.1, 3, 64)),
    "3x3 conv, stride 2": (nn.Conv2d(16, 8, 3, 2), torch.randn(4, 16, 6, 6) * torch.linspace(0.1, 3, 16)[:, None, None]),
    "1x1 conv": (nn.Conv2d(16, 8, 1), torch.randn(4, 16, 6, 6) * torch.linspace(0.1, 3, 16)[:, None, None]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_simulation_computes_what_xnnpack_computes(case, tmp_path):
    torch.manual_seed(0)
    layer, inputs = CASES[case]
    model = OneLayer(layer).eval()
    path = tmp_path / "m.tflite"
    report = export_tflite(model, inputs[:1], path, precision="dynamic_int8")
    assert report.layer_precisions == {"layer": "dynamic_int8"}
    runtime = LiteRTModel(path)
    got = np.concatenate([runtime(inputs[i:i + 1]) for i in range(len(inputs))])

    with torch.no_grad():
        reference = precision_reference(copy.deepcopy(model), report.layer_precisions)
        simulated = reference(inputs).numpy()
        reference.layer._forward_pre_hooks.clear()  # the same weights, without the rounding of the input
        weights_only = reference(inputs).numpy()
    scale = np.abs(got).max()
    assert np.abs(got - simulated).max() < 1e-5 * scale
    assert np.abs(got - weights_only).max() > 100 * np.abs(got - simulated).max()


def test_rows_take_their_own_range_and_hold_zero():
    x = torch.tensor([[0.5, 1.0, 2.0], [-4.0, -1.0, 3.0]])
    rounded = fake_quantize_rows(x, (-1,))
    # Row 1 spans [0, 2] (widened to hold 0): steps of 2/255; row 2 spans [-4, 3]: steps of 7/255.
    assert torch.allclose(rounded[0], x[0], atol=1 / 255 + 1e-7)
    assert (rounded[1] - x[1]).abs().max() <= 3.5 / 255 + 1e-6
    assert fake_quantize_rows(torch.zeros(2, 3), (-1,)).eq(0).all()  # an empty range: scale 1, exact zeros


def test_the_gradient_passes_straight_through():
    x = torch.randn(3, 8, requires_grad=True)
    fake_quantize_rows(x, (-1,)).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_a_depthwise_conv_has_no_dynamic_rows():
    assert row_dims_of(nn.Conv2d(8, 8, 3, groups=8)) is None
    assert row_dims_of(nn.Conv2d(8, 8, 1, padding="same")) == (1,)
    assert row_dims_of(nn.Conv2d(8, 8, 1, stride=2)) == (1, 2, 3)
