"""The full-int8 quantizer's annotations, op kind by op kind, and the upstream bug it steps around."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

from ai_edge_litert.interpreter import OpResolverType

from model_blocks import BasicResidual, SqueezeExcite
from sparselite.export.quantizer import FullInt8Quantizer, decompose_for_int8, op_kind


NO_DELEGATES = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES  # the file's own op list, not XNNPACK's partitions


def exported(model: nn.Module, shape=(1, 8, 6, 6)) -> torch.fx.GraphModule:
    return torch.export.export(model.eval(), (torch.randn(*shape),)).module()


def annotated(graph_module: torch.fx.GraphModule) -> dict[str, list[bool]]:
    """op kind -> for each node of that kind, whether it carries an output quantization spec."""
    found: dict[str, list[bool]] = {}
    for node in graph_module.graph.nodes:
        annotation = node.meta.get("quantization_annotation")
        found.setdefault(op_kind(node), []).append(bool(annotation and annotation.output_qspec is not None))
    return found


def test_silu_and_hardsigmoid_become_ops_with_int8_kernels():
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.SiLU(), nn.Conv2d(8, 8, 1), nn.Hardsigmoid())
    graph = decompose_for_int8(exported(model)).graph
    kinds = [op_kind(n) for n in graph.nodes if n.op == "call_function"]
    assert "silu" not in kinds and "hardsigmoid" not in kinds
    assert kinds.count("sigmoid") == 1 and kinds.count("mul") == 2 and "add" in kinds and "hardtanh" in kinds
    x = torch.randn(1, 8, 6, 6)
    decomposed = decompose_for_int8(exported(model))
    assert torch.allclose(decomposed(x), model(x), atol=1e-6)  # exact rewrites


def test_a_prelu_with_one_slope_becomes_a_leaky_relu():
    """One slope (nn.PReLU's default): LEAKY_RELU, which has an int8 kernel. One per channel: left as it is."""
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.PReLU(), nn.Conv2d(8, 8, 1), nn.PReLU(8))
    with torch.no_grad():
        model[1].weight.fill_(0.3)
    rewritten = decompose_for_int8(exported(model))
    kinds = [op_kind(n) for n in rewritten.graph.nodes if n.op == "call_function"]
    assert kinds.count("leaky_relu") == 1 and kinds.count("prelu") == 1
    x = torch.randn(1, 8, 6, 6)
    assert torch.equal(rewritten(x), model(x))


def test_layer_norm_and_attention_rewrites_are_exact():
    norm = nn.LayerNorm(16)
    attention = nn.MultiheadAttention(16, 2, batch_first=True).eval()

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.attn = norm, attention

        def forward(self, x):
            y = self.norm(x)
            return self.attn(y, y, y, need_weights=False)[0]

    model = Block().eval()
    rewritten = decompose_for_int8(exported(model, shape=(1, 5, 16)))
    x = torch.randn(1, 5, 16)
    assert torch.allclose(rewritten(x), model(x), atol=1e-5)
    kinds = {op_kind(n) for n in rewritten.graph.nodes}
    assert {"rsqrt", "matmul", "_softmax"} <= kinds and not {"layer_norm", "scaled_dot_product_attention"} & kinds


@pytest.mark.parametrize("block", [BasicResidual(8), SqueezeExcite(8)], ids=["shared_relu_residual", "squeeze_excite"])
def test_every_activation_op_gets_a_range(block):
    prepared = prepare_pt2e(exported(block), FullInt8Quantizer())
    kinds = {op_kind(n) for n in prepared.graph.nodes if n.op == "call_function"}
    # Every float value between ops is observed: no op is left with float input and output.
    for node in prepared.graph.nodes:
        if node.op == "call_function" and op_kind(node) in ("add", "mul", "relu", "hardtanh"):
            assert all(u.op == "call_module" for u in node.users), f"{node} has an unobserved output"
    assert kinds


def test_float_modules_stay_float_and_so_do_the_shape_ops_after_them():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.drop, self.fc2 = nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 16)

        def forward(self, x):
            return self.fc2(self.drop(self.act(self.fc1(x))).reshape(1, 5, 32))

    quantizer = FullInt8Quantizer(float_modules=frozenset({"act"}))
    graph_module = quantizer.annotate(quantizer.transform_for_annotation(exported(Mlp(), shape=(1, 5, 16))))
    kinds = annotated(graph_module)
    assert kinds["gelu"] == [False]  # the module kept float
    assert not any(kinds.get("dropout", []) + kinds.get("view", []) + kinds.get("reshape", []))  # nor a border right after it
    assert any(kinds["linear"])  # the rest is int8 as before


def test_a_shape_op_that_shared_a_float_layers_range_stays_float_with_it():
    """litert's annotator gives a permute after a linear the linear's range; with the linear kept float, the
    permute followed it (pt2e's prepare failed: ``KeyError: linear_1``, ConvNeXt's blocks with
    ``float_fallback="xnnpack"``), and the conv after it reads the float value through a range of its own."""

    class ChannelsLastMlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.conv = nn.Linear(8, 8), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.conv(self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))

    quantizer = FullInt8Quantizer(float_modules=frozenset({"fc"}))
    graph_module = quantizer.annotate(quantizer.transform_for_annotation(exported(ChannelsLastMlp())))
    kinds = annotated(graph_module)
    assert kinds["linear"] == [False] and kinds["permute"][-1] is False
    assert any(kinds["conv2d"])
    prepare_pt2e(torch.export.export(ChannelsLastMlp().eval(), (torch.randn(1, 8, 6, 6),)).module(),
                 FullInt8Quantizer(float_modules=frozenset({"fc"})))  # raised KeyError


def test_upstream_litert_gru_annotator_raises_without_h0():
    """litert-torch 0.10's ``gru_io_only`` annotator reads ``input_nodes[1]`` as the hidden state, so a GRU
    called without h0 raises IndexError (docs/upstream/litert_gru_annotator.md). sparselite's quantizer
    does not run that annotator. When this test fails, upstream has fixed it."""
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config

    class Rows(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(8, 16, batch_first=True)

        def forward(self, x):
            return self.gru(x)[0]

    graph = torch.export.export(Rows().eval(), (torch.randn(1, 5, 8),)).module()
    stock = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    with pytest.raises(IndexError):
        prepare_pt2e(graph, stock)
    graph = torch.export.export(Rows().eval(), (torch.randn(1, 5, 8),)).module()
    prepare_pt2e(graph, FullInt8Quantizer())  # no error: the GRU stays float, reported as a float island


def test_upstream_xnnpack_does_not_delegate_int8_hardswish(monkeypatch, tmp_path):
    """ai-edge-litert 2.3's XNNPACK delegate leaves an int8 HARD_SWISH to TFLite's own kernel, which splits
    the graph in two (and made mobilenet_v3 slower in int8 than in fp32). sparselite writes hardswish as
    x * relu6(x + 3) / 6 instead (docs/upstream/xnnpack_int8_hardswish.md). When this test fails,
    XNNPACK delegates HARD_SWISH and the rewrite can go."""
    from conftest import xnnpack_partitions

    from sparselite import export_tflite
    from sparselite.export import quantizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Hardswish(), nn.Conv2d(8, 8, 1)).eval()
    x = torch.randn(16, 8, 8, 8)
    export_tflite(model, x[:1], tmp_path / "rewritten.tflite", calibration_data=[x])
    assert xnnpack_partitions(tmp_path / "rewritten.tflite") == 1
    monkeypatch.delitem(quantizer._DECOMPOSITIONS, "hardswish")
    export_tflite(model, x[:1], tmp_path / "stock.tflite", calibration_data=[x])
    assert xnnpack_partitions(tmp_path / "stock.tflite") == 2


class _ConcatenationOfOne(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([torch.relu(self.conv1(x))], 1)
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def test_upstream_litert_keeps_the_bias_grid_of_a_dropped_single_input_concatenation(monkeypatch, tmp_path):
    """litert-torch 0.10 drops ``torch.cat([x])`` but leaves the next layer's int32 bias on the grid of the
    concatenation's scale while the layer reads x on x's (docs/upstream/litert_single_input_concatenation.md).
    sparselite removes such concatenations before quantizing. When this test fails, the two files agree,
    upstream is fixed, and ``quantizer._drop_concatenations_of_one`` can go."""
    from sparselite.export import quantizer
    from sparselite.export.conversion import convert_with_ranges
    from sparselite.runtime.litert import LiteRTModel
    from sparselite.tflite.flatbuffer import write_model

    torch.manual_seed(0)
    model = _ConcatenationOfOne().eval()
    x = torch.randn(64, 1, 12, 12)
    with torch.no_grad():
        logits = model(x)
    # The concatenation's range twice its input's: the two scales differ, as QAT's two points may.
    ranges = {"": (-4.0, 4.0), "conv1": (0.0, 3.0), "sparselite_op_quant.cat_0": (0.0, 6.0), "conv2": (0.0, 3.0),
              "fc": (float(logits.min()), float(logits.max()))}
    files = {}
    for name in ("workaround", "stock"):
        if name == "stock":
            monkeypatch.setattr(quantizer, "_drop_concatenations_of_one", lambda graph: None)
        model_t, _ = convert_with_ranges(model, (x[:1],), ranges, [])
        (tmp_path / f"{name}.tflite").write_bytes(write_model(model_t))
        files[name] = LiteRTModel(tmp_path / f"{name}.tflite")
    workaround, stock = files["workaround"], files["stock"]
    scale = workaround.output_quantization[0]
    q = np.clip(np.round(x.numpy() / (8.0 / 255)) - 128 + 128, -128, 127).astype(np.int8)  # on the input grid
    assert np.abs(workaround(q) - stock(q)).max() > 4 * scale  # the stock file's layer after the concatenation is off


def test_upstream_litert_scalar_operands_keep_ops_in_nchw_between_transposes():
    """litert-torch 0.10's quantizer turns the scalar of ``x + 3`` into a 0-d constant tensor, and its layout
    pass then keeps that ADD in torch's NCHW layout, between two TRANSPOSEs that the float file does not have
    (docs/upstream/litert_scalar_constant_transposes.md). sparselite's quantizer gives such constants the
    other operand's rank. When this test fails, upstream has fixed it and the reshape can go."""
    import litert_torch
    from ai_edge_litert.interpreter import Interpreter

    from conftest import pt2e_int8_tflite

    def transposes(model_bytes: bytes) -> int:
        interpreter = Interpreter(model_content=model_bytes, experimental_op_resolver_type=NO_DELEGATES)
        return sum(op["op_name"] == "TRANSPOSE" for op in interpreter._get_ops_details())

    class ShiftBetweenConvs(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)

        def forward(self, x):
            return self.second(self.first(x) + 3.0)

    torch.manual_seed(0)
    model, example = ShiftBetweenConvs().eval(), torch.randn(1, 3, 12, 12)
    float_file = litert_torch.convert(model, (example,)).model_content()
    assert transposes(pt2e_int8_tflite(model, example)) >= transposes(float_file) + 2
