"""The parity gate's rule on logits (export/parity.py); the gate on real files is in test_tflite.py."""

from __future__ import annotations

import numpy as np
import pytest

from sparselite.export.parity import MIN_KERNEL_AGREEMENT, compare_logits, gate_failure
from sparselite.export.report import Parity


def test_parity_leaves_out_exact_ties_and_flags_dead_or_saturated_models():
    rng = np.random.default_rng(0)
    scale = 0.1
    expected = np.round(rng.normal(size=(200, 10)) / scale) * scale
    expected[:5, :2] = expected[:5].max(axis=1, keepdims=True) + scale  # five exact ties at the top
    got = expected + scale * rng.integers(-1, 2, size=expected.shape)  # off by at most 1 LSB
    parity = compare_logits(expected, got, scale, "fake-quant")
    assert parity.ties_excluded >= 5 and parity.trustworthy
    assert parity.max_logit_diff_lsb == pytest.approx(1.0, abs=0.01)

    broken = rng.permutation(got)  # a file that answers for other inputs: a broken export must not pass
    assert compare_logits(expected, broken, scale, "fake-quant").top1_agreement < 0.5

    dead = np.tile(expected[:1], (200, 1))
    assert "same logits" in compare_logits(dead, dead, scale, "fake-quant").degenerate_reference
    one_class = expected.copy()
    one_class[:, 3] = 100.0
    assert "predicts class 3" in compare_logits(one_class, one_class, scale, "fake-quant").degenerate_reference
    clipped = np.clip(expected, None, 0.5)  # a saturated int8 output: most examples tie at the top
    assert "clips" in compare_logits(clipped, clipped, scale, "fake-quant").degenerate_reference


def test_when_every_example_ties_the_same_top_classes_agree():
    """A zero-initialized head (torchvision's ViT) gives every example equal logits: no top-1 to compare, but a
    file that computes the same ties agrees, and one that does not, fails."""
    scale = 0.1
    zero_head = np.zeros((16, 10))
    parity = compare_logits(zero_head, zero_head, scale, "simulated-precision")
    assert parity.top1_agreement == 1.0 and parity.ties_excluded == 16
    assert "same logits" in parity.degenerate_reference
    wrong = zero_head.copy()
    wrong[:, 0] = 0.05  # no tie any more in the file
    assert compare_logits(zero_head, wrong, scale, "simulated-precision").top1_agreement == 0.0


def parity(agreement: float, kernel_agreement: float | None) -> Parity:
    return Parity(500, agreement, 6.0, 0.1, "fake-quant", kernel_agreement=kernel_agreement, kernel_max_lsb=7.0)


def test_the_gate_passes_at_min_agreement():
    assert gate_failure(parity(0.99, None), 0.98) is None
    assert "only 97.00%" in gate_failure(parity(0.97, None), 0.98)
    float_file = Parity(500, 0.97, 6.0, 1.0, "simulated-precision")  # a dynamic-range or fp16 file
    assert "precision='fp32'" in gate_failure(float_file, 0.98)


def test_a_file_as_faithful_as_the_runtimes_are_to_each_other_passes():
    # XNNPACK and the builtin kernels agree on 95% of one file: a file agreeing 96% with torch is within that noise.
    assert gate_failure(parity(0.96, 0.95), 0.98) is None
    message = gate_failure(parity(0.94, 0.95), 0.98)
    assert "below the 95.00% at which XNNPACK and TFLite's builtin kernels agree" in message


def test_the_noise_floor_lets_nothing_through_when_the_runtimes_disagree_too_much():
    low = MIN_KERNEL_AGREEMENT - 0.05
    message = gate_failure(parity(low + 0.01, low), 0.98)
    assert "amplifies int8 rounding too much" in message


def test_a_dense_output_is_compared_at_every_position():
    """A segmentation head's [N, C, H, W] scores: top-1 over the channels at each position."""
    rng = np.random.default_rng(0)
    expected = rng.normal(size=(4, 3, 5, 5)).astype(np.float32)
    got = expected.copy()
    got[0, :, 0, 0] = [0.0, 0.0, 10.0] if expected[0, :, 0, 0].argmax() != 2 else [10.0, 0.0, 0.0]
    parity = compare_logits(expected, got, 0.1, "fake-quant")
    assert parity.examples == 4
    assert parity.top1_agreement == pytest.approx(1 - 1 / 100)
