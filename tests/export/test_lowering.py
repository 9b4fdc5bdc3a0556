"""Ops litert-torch cannot lower, rewritten into ones it can (``export/lowering.py``), and the upstream gap."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparselite.export.lowering import lower_for_litert, needs_lowering
from sparselite.export.conversion import export_float_tflite
from sparselite.runtime.litert import LiteRTModel
from sparselite.tflite.flatbuffer import builtin_code, builtin_name, read_model


def test_upstream_litert_cannot_lower_adaptive_max_pool():
    """docs/upstream/litert_adaptive_max_pool.md. When this test fails, upstream converts the op."""
    import litert_torch

    with pytest.raises(Exception, match="Lowering not found: aten.adaptive_max_pool2d"):
        litert_torch.convert(nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveMaxPool2d(1)).eval(), (torch.zeros(1, 1, 8, 8),))


@pytest.mark.parametrize("output_size", [1, (2, 3), (3, 3), (6, 6)])  # global, non-tiling, tiling (6 | 6)
def test_adaptive_max_pool_rewrite_is_exact(output_size):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveMaxPool2d(output_size)).eval()
    x = torch.randn(2, 1, 8, 8)
    graph = torch.export.export(model, (x[:1],)).module()
    assert needs_lowering(graph)
    assert lower_for_litert(graph) == 1 and not needs_lowering(graph)
    assert torch.equal(graph(x[:1]), model(x[:1]))


def test_float_export_of_a_global_max_pooling_head(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(4, 1, 8, 8)
    export_float_tflite(model, x[:1], tmp_path / "m.tflite")
    file = read_model(tmp_path / "m.tflite")
    assert "REDUCE_MAX" in {builtin_name(builtin_code(file, op)) for op in file.subgraphs[0].operators}
    with torch.no_grad():
        expected = model(x).numpy()
    assert abs(LiteRTModel(tmp_path / "m.tflite", accelerator="xnnpack", threads=1)(x.numpy()) - expected).max() < 1e-5


def test_indices_that_are_read_are_left_to_litert():
    class WithIndices(nn.Module):
        def forward(self, x):
            values, indices = nn.functional.adaptive_max_pool2d(x, 1, return_indices=True)
            return values + indices.float()

    graph = torch.export.export(WithIndices(), (torch.randn(1, 2, 4, 4),)).module()
    assert lower_for_litert(graph) == 0


class ExpandedContext(nn.Module):
    """MobileViTv2's linear attention in small: a context vector expanded to the values' shape, multiplied
    in, then a conv (docs/upstream/litert_expand_before_broadcast.md)."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.channels = channels
        self.qkv, self.out = nn.Conv2d(channels, 1 + 2 * channels, 1), nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, key, value = self.qkv(x).split([1, self.channels, self.channels], dim=1)
        context = (key * query.softmax(-1)).sum(-1, keepdim=True)
        return self.out(torch.relu(value) * context.expand_as(value))


def test_upstream_litert_cannot_convert_an_expand_before_a_broadcasting_mul():
    """docs/upstream/litert_expand_before_broadcast.md. When this test fails, upstream converts it."""
    import litert_torch

    with pytest.raises(Exception, match="broadcast-compatible"):
        litert_torch.convert(ExpandedContext().eval(), (torch.randn(1, 8, 4, 16),))


def test_an_expand_read_only_by_broadcasting_ops_is_dropped_and_the_model_exports(tmp_path):
    model = ExpandedContext().eval()
    x = torch.randn(3, 8, 4, 16)
    graph = torch.export.export(model, (x[:1],)).module()
    assert lower_for_litert(graph) == 1
    assert torch.equal(graph(x[:1]), model(x[:1]))
    export_float_tflite(model, x[:1], tmp_path / "m.tflite")
    with torch.no_grad():
        expected = model(x[:1]).numpy()
    assert abs(LiteRTModel(tmp_path / "m.tflite", accelerator="xnnpack", threads=1)(x[:1].numpy()) - expected).max() < 1e-4


def test_an_expand_that_sets_the_output_shape_stays():
    class Tiled(nn.Module):
        def forward(self, x):
            return x.sum(-1, keepdim=True).expand(-1, -1, 4) * 2.0  # the product's shape comes from the expand

    graph = torch.export.export(Tiled(), (torch.randn(1, 2, 4),)).module()
    assert lower_for_litert(graph) == 0
