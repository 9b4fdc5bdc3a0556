"""Fake-quant matches TFLite's int8 scheme: per-channel symmetric weights, per-tensor affine activations."""

from __future__ import annotations

import pytest
import torch

from sparselite.quantization.fake_quant import ActivationFakeQuant, WeightFakeQuant
from sparselite.quantization.spec import SCALE_EPS, activation_qparams, batchnorm_fold_factor, quantize_weight, weight_scales


@pytest.fixture
def weight() -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3) * torch.logspace(-1, 0.5, 8).reshape(8, 1, 1, 1)
    w[3] = 0.0  # a fully pruned channel
    w[5] *= 1e-4  # a channel so small its scale hits the eps floor
    return w


def reference_weight_fake_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = w.abs().reshape(w.shape[0], -1).amax(1)
    scale = torch.clamp(amax / 127.0, min=2.0**-12).reshape(-1, 1, 1, 1)
    q = torch.clamp(torch.round(w / scale), -127, 127)
    return q * scale, q


def test_weight_scales_are_per_channel_symmetric_with_eps_floor(weight):
    scales = weight_scales(weight)
    assert scales.shape == (8,)
    amax = weight.abs().reshape(8, -1).amax(1)
    assert torch.equal(scales, torch.clamp(amax / 127.0, min=2.0**-12))
    assert SCALE_EPS == 2.0**-12
    assert scales[3] == SCALE_EPS and scales[5] == SCALE_EPS
    assert scales[7] > scales[0]


def test_weight_fake_quant_equals_the_spec(weight):
    out = WeightFakeQuant()(weight)
    expected, q = reference_weight_fake_quant(weight)
    assert torch.allclose(out, expected, rtol=0, atol=1e-7)
    assert torch.equal(quantize_weight(weight), q.to(torch.int8))
    # On the int8 grid, within [-127, 127]; the largest weight of every live channel maps to +-127.
    levels = out / weight_scales(weight).reshape(-1, 1, 1, 1)
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert int(levels.round().abs().max()) == 127
    for channel in (0, 1, 2, 4, 6, 7):
        assert int(levels[channel].round().abs().max()) == 127
    assert int(quantize_weight(weight).min()) >= -127  # -128 is never used: symmetric


def test_weight_scale_follows_the_current_weights():
    quant = WeightFakeQuant()
    w = torch.tensor([[0.5, -1.0, 0.25]])
    first = quant(w)
    second = quant(w * 4)
    assert torch.allclose(second, first * 4)  # no lagging range: scale tracks the new weights at once
    assert torch.allclose(first, w, atol=1.0 / 127 / 2)
    assert list(quant.state_dict()) == []  # stateless


def test_weight_fake_quant_disabled_is_identity(weight):
    quant = WeightFakeQuant()
    quant.enabled = False
    assert quant(weight) is weight


def test_pruned_zeros_stay_exactly_zero(weight):
    torch.manual_seed(1)
    w = weight.clone()
    mask = torch.rand_like(w) < 0.7
    w[mask] = 0.0
    out = WeightFakeQuant()(w)
    assert torch.equal(out[mask], torch.zeros_like(out[mask]))
    assert torch.equal(quantize_weight(w)[mask], torch.zeros(int(mask.sum()), dtype=torch.int8))
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # a fully pruned channel stays zero too


def test_weight_fake_quant_gradient_is_straight_through():
    w = torch.tensor([[0.3, -0.7, 1.0]], requires_grad=True)
    WeightFakeQuant()(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize(
    "lo, hi, scale, zero_point",
    [
        (-1.0, 3.0, 4.0 / 255, -64),  # -128 - round(-1 / (4/255)) = -128 + 64
        (0.0, 6.0, 6.0 / 255, -128),  # ReLU6 output
        (2.0, 6.0, 6.0 / 255, -128),  # widened to contain 0
        (-4.0, -1.0, 4.0 / 255, 127),  # widened to contain 0
        (-0.5, 12.25, 12.75 / 255, -118),  # -128 - round(-0.5 / 0.05) = -128 + 10
        (0.0, 0.0, 2.0**-12, -128),  # eps floor
    ],
)
def test_activation_qparams_formula(lo, hi, scale, zero_point):
    got_scale, got_zp = activation_qparams(torch.tensor(lo), torch.tensor(hi))
    assert got_scale.shape == () and got_zp.dtype == torch.int32
    assert float(got_scale) == pytest.approx(scale, rel=1e-6)
    assert int(got_zp) == zero_point
    # The int8 grid covers the observed range (widened to contain 0, which maps to the integer zero_point).
    lo_rep = (-128 - int(got_zp)) * float(got_scale)
    hi_rep = (127 - int(got_zp)) * float(got_scale)
    assert lo_rep <= min(lo, 0.0) + float(got_scale) and hi_rep >= max(hi, 0.0) - float(got_scale)


def test_activation_fake_quant_observes_moving_average_range():
    quant = ActivationFakeQuant(averaging_constant=0.25).train()
    assert not quant.initialized
    quant(torch.tensor([-1.0, 0.0, 3.0]))  # the first batch initializes the range
    assert quant.initialized
    assert quant.min_max.tolist() == [-1.0, 3.0]
    quant(torch.tensor([-5.0, 7.0]))
    assert quant.min_max.tolist() == pytest.approx([-1.0 + 0.25 * (-5.0 + 1.0), 3.0 + 0.25 * (7.0 - 3.0)])
    assert "min_max" in quant.state_dict()


def test_activation_fake_quant_rounds_to_the_int8_grid_and_clamps():
    quant = ActivationFakeQuant().train()
    quant(torch.tensor([-1.0, 3.0]))
    quant.eval()
    x = torch.linspace(-3.0, 6.0, 101)
    out = quant(x)
    scale, zp = quant.qparams()
    levels = out / scale + zp
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert float(levels.min()) == pytest.approx(-128, abs=1e-3) and float(levels.max()) == pytest.approx(127, abs=1e-3)
    assert float(quant(torch.zeros(3)).abs().max()) == 0.0
    assert quant.min_max.tolist() == [-1.0, 3.0]  # eval() does not observe


def test_activation_fake_quant_passthrough_until_initialized_or_when_disabled():
    quant = ActivationFakeQuant().eval()
    x = torch.tensor([0.123, -4.56])
    assert torch.equal(quant(x), x)  # nothing observed yet
    quant.train()
    quant.enabled = False
    y = torch.tensor([0.1234, 0.5])
    assert torch.equal(quant(y), y)
    assert quant.initialized  # still observed while disabled
    quant.observing = False
    quant(torch.tensor([100.0]))
    assert quant.min_max.tolist() == pytest.approx([0.1234, 0.5])


def test_per_tensor_fake_quant_is_bit_identical_to_torch_kernel_in_values_and_gradients():
    from sparselite.quantization.fake_quant import fake_quantize_per_tensor

    torch.manual_seed(0)
    scale, zero_point = torch.tensor(0.02), torch.tensor(-30, dtype=torch.int32)
    # Inside the int8 range, mostly clipped, and the edge: the largest value rounds onto qmax itself
    # (with its [min, max] given, the mask is skipped only when nothing is clamped).
    for spread in (0.5, 50.0, (127 + 30 + 0.49) * 0.02):
        x = torch.randn(4, 8, 5, 5)
        x = (x / x.abs().max() * spread).requires_grad_()
        expected = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, -128, 127)
        upstream = torch.randn_like(x)
        expected_grad = torch.autograd.grad((expected * upstream).sum(), x)[0]
        for extremes in (None, torch.stack(torch.aminmax(x.detach()))):
            got = fake_quantize_per_tensor(x, scale, zero_point, extremes)
            assert torch.equal(got, expected)
            assert torch.equal(torch.autograd.grad((got * upstream).sum(), x)[0], expected_grad)


def test_weight_fake_quant_is_bit_identical_to_torch_kernel_in_values_and_gradients(weight):
    """Also with a BN fold factor, whose eps floor makes some scales larger than amax / 127."""
    from torch import nn

    bn = nn.BatchNorm2d(weight.shape[0])
    bn.running_var.uniform_(1e-9, 4.0)
    bn.weight.data.uniform_(-2.0, 2.0)
    bn.weight.data[2] = 1e-9
    for batchnorm in (None, bn):
        w = (weight * 3).requires_grad_()
        quant = WeightFakeQuant(batchnorm)
        factor = batchnorm_fold_factor(bn) if batchnorm is not None else None
        scales = weight_scales(w, factor)
        expected = torch.fake_quantize_per_channel_affine(w, scales, torch.zeros(len(scales), dtype=torch.int32), 0, -127, 127)
        got = quant(w)
        assert torch.equal(got, expected)
        upstream = torch.randn_like(w)
        assert torch.equal(torch.autograd.grad((got * upstream).sum(), w)[0],
                           torch.autograd.grad((expected * upstream).sum(), w)[0])
