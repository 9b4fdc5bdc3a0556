"""Mask math: patterns, per-layer masks, TFLite-layout blocks, N:M runs, global thresholds."""

from __future__ import annotations

import pytest
import torch

from sparselite.errors import SparseliteError
from sparselite.pruning.masks import Pattern, global_masks, layer_mask, to_tflite_2d, from_tflite_2d


@pytest.fixture
def conv_weight() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(32, 16, 3, 3)  # TFLite 2-D: [32, 3*3*16 = 144]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("unstructured", Pattern("unstructured")),
        (" Unstructured ", Pattern("unstructured")),
        ("1x1", Pattern("unstructured")),
        ("1x4", Pattern("block", rows=1, cols=4)),
        ("1x16", Pattern("block", rows=1, cols=16)),
        ("2x8", Pattern("block", rows=2, cols=8)),
        ("2:4", Pattern("n:m", n=2, m=4)),
    ],
)
def test_parse_valid_patterns(text, expected):
    pattern = Pattern.parse(text)
    assert pattern == expected
    assert Pattern.parse(str(pattern)) == pattern


@pytest.mark.parametrize("text", ["", "random", "1x", "x4", "1x4x4", "0x4", "1x0", "4:4", "0:4", "5:4", "2-4"])
def test_parse_rejects_bad_patterns(text):
    with pytest.raises(SparseliteError, match="pattern"):
        Pattern.parse(text)


def test_max_sparsity():
    assert Pattern.parse("2:4").max_sparsity == 0.5
    assert Pattern.parse("1:4").max_sparsity == 0.75
    assert Pattern.parse("1x16").max_sparsity == 1.0


def test_tflite_layout_round_trip(conv_weight):
    matrix = to_tflite_2d(conv_weight)
    assert matrix.shape == (32, 144)
    # OHWI: the last axis runs over input channels first, then kw, then kh.
    assert torch.equal(matrix[5, :16], conv_weight[5, :, 0, 0])
    assert torch.equal(matrix[5, 16:32], conv_weight[5, :, 0, 1])
    assert torch.equal(from_tflite_2d(matrix, conv_weight.shape), conv_weight)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (64, 32, 1, 1), (10, 32)])
def test_unstructured_mask_hits_the_requested_sparsity(shape, sparsity):
    torch.manual_seed(1)
    weight = torch.randn(shape)
    mask = layer_mask(weight, sparsity, Pattern.parse("unstructured"))
    assert mask.shape == weight.shape
    assert int((mask == 0).sum()) == round(sparsity * weight.numel())
    # The pruned weights are the smallest ones.
    if 0 < sparsity:
        assert weight[mask == 0].abs().max() <= weight[mask != 0].abs().min()


@pytest.mark.parametrize("block", ["1x4", "1x16", "2x8", "4x1"])
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_block_masks_are_constant_per_block_in_tflite_layout(conv_weight, block, sparsity):
    pattern = Pattern.parse(block)
    mask = layer_mask(conv_weight, sparsity, pattern)
    matrix = to_tflite_2d(mask)
    rows, cols = matrix.shape
    blocks = matrix.reshape(rows // pattern.rows, pattern.rows, cols // pattern.cols, pattern.cols)
    per_block_min = blocks.amin(dim=(1, 3))
    per_block_max = blocks.amax(dim=(1, 3))
    assert torch.equal(per_block_min, per_block_max), "a block mixes kept and pruned weights"
    n_blocks = per_block_min.numel()
    assert int((per_block_min == 0).sum()) == round(sparsity * n_blocks)
    assert float((mask == 0).float().mean()) == pytest.approx(sparsity, abs=1 / n_blocks)


def test_block_mask_is_not_constant_in_pytorch_layout(conv_weight):
    # Guards the layout: 1x16 blocks run over input channels at one (kh, kw), not over a kernel row.
    mask = layer_mask(conv_weight, 0.5, Pattern.parse("1x16"))
    assert torch.equal(mask[:, :, 1, 2].amin(dim=1), mask[:, :, 1, 2].amax(dim=1))
    flat = mask.reshape(32, -1)  # [out, in*kh*kw]: consecutive elements are kernel positions
    runs = flat.reshape(32, -1, 16)
    assert not torch.equal(runs.amin(-1), runs.amax(-1))


@pytest.mark.parametrize("nm", ["2:4", "1:4", "2:8"])
def test_n_m_masks_keep_at_most_n_per_run(conv_weight, nm):
    pattern = Pattern.parse(nm)
    mask = layer_mask(conv_weight, pattern.max_sparsity, pattern)
    runs = to_tflite_2d(mask).reshape(-1, pattern.m)
    assert int(runs.sum(dim=1).max()) <= pattern.n
    assert float((mask == 0).float().mean()) == pytest.approx(pattern.max_sparsity)


def test_n_m_ramps_up_inside_the_structure(conv_weight):
    pattern = Pattern.parse("2:4")
    half_way = layer_mask(conv_weight, 0.25, pattern)
    assert float((half_way == 0).float().mean()) == pytest.approx(0.25, abs=1e-3)
    full = layer_mask(conv_weight, 0.5, pattern)
    # Every weight dropped at 25% is also dropped at 50%: the ramp stays inside the final N:M mask.
    assert not bool((half_way == 0)[full != 0].any())


@pytest.mark.parametrize(
    "pattern, shape, message",
    [
        ("1x16", (32, 6, 1, 1), "does not tile layer 'conv'"),
        ("2x4", (5, 16, 1, 1), "does not tile layer 'conv'"),
        ("2:4", (8, 6), "not a multiple of 4"),
    ],
)
def test_block_that_does_not_divide_the_layer_is_rejected(pattern, shape, message):
    with pytest.raises(SparseliteError, match=message) as info:
        Pattern.parse(pattern).check_fits(torch.Size(shape), "conv")
    assert "overrides" in str(info.value)


def test_check_fits_accepts_a_layer_that_tiles():
    Pattern.parse("1x16").check_fits(torch.Size((32, 16, 3, 3)), "ok")  # in = 3*3*16 = 144 = 9*16
    Pattern.parse("2:4").check_fits(torch.Size((10, 32)), "fc")


def test_global_masks_share_one_threshold():
    torch.manual_seed(2)
    weights = {"big": torch.randn(64, 64) * 2.0, "small": torch.randn(32, 64) * 0.5}
    masks = global_masks(weights, 0.6, Pattern.parse("unstructured"))
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((m == 0).sum()) for m in masks.values())
    assert zeros == round(0.6 * total)
    pruned_max = max(float(w[masks[n] == 0].abs().max()) for n, w in weights.items())
    kept_min = min(float(w[masks[n] != 0].abs().min()) for n, w in weights.items())
    assert pruned_max <= kept_min
    # One threshold: the layer with smaller weights loses more than the target, the larger one less.
    assert float((masks["small"] == 0).float().mean()) > 0.6 > float((masks["big"] == 0).float().mean())


def test_global_block_masks_share_one_threshold_over_blocks():
    torch.manual_seed(3)
    weights = {"a": torch.randn(16, 64), "b": torch.randn(8, 32) * 3}
    pattern = Pattern.parse("1x16")
    masks = global_masks(weights, 0.5, pattern)
    n_blocks = sum(w.numel() // 16 for w in weights.values())
    pruned_blocks = sum(int((m.reshape(-1, 16).amax(1) == 0).sum()) for m in masks.values())
    assert pruned_blocks == round(0.5 * n_blocks)
    for mask in masks.values():
        blocks = mask.reshape(-1, 16)
        assert torch.equal(blocks.amin(1), blocks.amax(1))
