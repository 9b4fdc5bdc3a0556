"""Files that are not fully int8: dynamic-range int8, fp16 and fp32 weights, per layer.

Each precision on a unit-sized model, read back from the file (op and tensor types) and checked against
the float model with its weights as the file stores them; per-layer mappings; the refusals.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ai_edge_litert.schema_py_generated import TensorType
from torch import nn

from sparselite import ExportOptions, LiteRTModel, SparseliteError, export_tflite
from sparselite.models.sequence import GRUClassifier
from sparselite.tflite.flatbuffer import builtin_code, builtin_name, read_model


class ConvMLP(nn.Module):
    """Convs, a depthwise conv and two linears: every kind of weight the precision pass meets. The stem
    reads one channel: the converter writes it as a DEPTHWISE_CONV_2D (channel multiplier 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, 2)
        self.conv = nn.Conv2d(8, 16, 1)
        self.depthwise = nn.Conv2d(16, 16, 3, 2, groups=16)
        self.hidden = nn.Linear(16 * 6 * 6, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.depthwise(F.relu(self.conv(F.relu(self.stem(x))))))
        return self.head(F.relu(self.hidden(x.flatten(1))))


def trained(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], steps: int = 60) -> nn.Module:
    torch.manual_seed(0)
    images, labels = data
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    for step in range(steps):
        batch = slice(step * 32 % 960, step * 32 % 960 + 32)
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def weight_types(path) -> dict[str, set[int]]:
    """Op type -> the types of the constant weights it reads (through a DEQUANTIZE: that input's type)."""
    model = read_model(path)
    subgraph = model.subgraphs[0]
    producers = {int(t): op for op in subgraph.operators for t in op.outputs}
    found: dict[str, set[int]] = {}
    for op in subgraph.operators:
        name = builtin_name(builtin_code(model, op))
        if name not in ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D"):
            continue
        weight = int(op.inputs[1])
        source = producers.get(weight)
        if source is not None and builtin_name(builtin_code(model, source)) == "DEQUANTIZE":
            weight = int(source.inputs[0])
        found.setdefault(name, set()).add(subgraph.tensors[weight].type)
    return found


@pytest.fixture(scope="module")
def conv_mlp(fmnist_train):
    torch.manual_seed(0)
    return trained(ConvMLP(), fmnist_train)


@pytest.mark.parametrize("precision, expected", [
    ("fp32", {"FULLY_CONNECTED": {TensorType.FLOAT32}, "CONV_2D": {TensorType.FLOAT32}}),
    ("fp16", {"FULLY_CONNECTED": {TensorType.FLOAT16}, "CONV_2D": {TensorType.FLOAT16},
              "DEPTHWISE_CONV_2D": {TensorType.FLOAT16}}),
    ({"default": "dynamic_int8", "depthwise": "fp32"},
     {"FULLY_CONNECTED": {TensorType.INT8}, "CONV_2D": {TensorType.INT8}, "DEPTHWISE_CONV_2D": {TensorType.FLOAT32}}),
])
def test_each_precision_writes_its_weights_and_agrees_with_the_model(conv_mlp, fmnist_heldout, tmp_path, precision,
                                                                     expected):
    path = tmp_path / "m.tflite"
    images = fmnist_heldout[0][:256]
    report = export_tflite(conv_mlp, images[:1], path, verify_data=[images], precision=precision)  # the default gate
    types = weight_types(path)
    assert {op: types[op] for op in expected} == expected
    # Activations stay float: the file's input and output are float32, and so is every op's output.
    model = read_model(path)
    subgraph = model.subgraphs[0]
    assert all(subgraph.tensors[int(t)].type == TensorType.FLOAT32 for op in subgraph.operators for t in op.outputs)
    assert report.parity.top1_agreement_all >= 0.98 and report.ranges_learned == report.ranges_calibrated == 0
    # The reference rounds weights and dynamic-range inputs as the file does: only float rounding is left.
    assert report.parity.max_logit_diff_lsb < 1e-4
    assert report.precision == precision


def test_dynamic_weights_are_the_int8_values_qat_trains_on(conv_mlp, fmnist_heldout, tmp_path):
    from sparselite.quantization.spec import quantize_weight
    from sparselite.tflite.constant_values import tensor_values

    path = tmp_path / "m.tflite"
    report = export_tflite(conv_mlp, fmnist_heldout[0][:1], path, precision={"default": "dynamic_int8", "depthwise": "fp16"})
    model = read_model(path)
    head = next(t for t in model.subgraphs[0].tensors if t.type == TensorType.INT8 and list(t.shape) == [10, 32])
    assert torch.equal(torch.from_numpy(tensor_values(model, head)), quantize_weight(conv_mlp.head.weight))
    assert list(head.quantization.scale.shape) == [10] and head.quantization.quantizedDimension == 0
    # The replaced float weights' buffers are emptied; the metadata's (min_runtime_version, ...) are kept.
    assert model.metadata and all(model.buffers[entry.buffer].data is not None for entry in model.metadata)
    # The stem is a DEPTHWISE_CONV_2D in the file, which has no dynamic-range kernel: it stays fp32, and says so.
    assert report.layer_precisions == {"stem": "fp32", "conv": "dynamic_int8", "depthwise": "fp16",
                                       "hidden": "dynamic_int8", "head": "dynamic_int8"}
    assert any("stem" in note and "dynamic_int8 asked, fp32 written" in note for note in report.notes)


def test_an_int8_file_makes_the_layers_of_its_float_islands_dynamic_range(fmnist_train, fmnist_heldout, tmp_path):
    """``{"default": "int8", ...}``: the int8 file, with the named layers dynamic-range where the file keeps
    them float (attention, between its float softmax and the float ops XNNPACK lacks int8 for); a named
    layer the file holds in int8 stays int8, and the report says so."""
    from model_blocks import TransformerBlockNet

    model = trained(TransformerBlockNet(), fmnist_train, steps=30)
    images = fmnist_heldout[0][:128]
    path = tmp_path / "m.tflite"
    report = export_tflite(model, images[:1], path, verify_data=[images], calibration_data=[fmnist_train[0][:128]],
                           precision={"default": "int8", "attn": "dynamic_int8", "head": "dynamic_int8"},
                           float_fallback="xnnpack", min_agreement=0.9)
    model_t = read_model(path)
    subgraph = model_t.subgraphs[0]
    fully_connected = [(subgraph.tensors[int(op.inputs[1])].name.decode().split(";")[0],
                        subgraph.tensors[int(op.inputs[0])].type, subgraph.tensors[int(op.inputs[1])].type)
                       for op in model_t.subgraphs[0].operators if builtin_name(builtin_code(model_t, op)) == "FULLY_CONNECTED"]
    attention = [(inputs, weights) for name, inputs, weights in fully_connected if name.startswith("attn")]
    assert attention and set(attention) == {(TensorType.FLOAT32, TensorType.INT8)}  # dynamic range: float input
    assert {(inputs, weights) for name, inputs, weights in fully_connected if name.startswith(("mlp", "head"))} == \
        {(TensorType.INT8, TensorType.INT8)}
    assert report.layer_precisions == {"attn": "dynamic_int8"}
    assert any("int8 file holds in int8" in note and "head" in note for note in report.notes)


def test_a_recurrent_layer_is_dynamic_at_every_step(fmnist_train, fmnist_heldout, tmp_path):
    """The converter unrolls the GRU into FULLY_CONNECTED ops; the recurrent weight is one constant, named
    after no module, read at every step: it is found by its values."""
    model = trained(GRUClassifier(hidden=16), fmnist_train, steps=40)
    path = tmp_path / "gru.tflite"
    images = fmnist_heldout[0][:128]
    report = export_tflite(model, images[:1], path, verify_data=[images], precision="dynamic_int8", min_agreement=0.9)
    assert weight_types(path) == {"FULLY_CONNECTED": {TensorType.INT8}}
    assert report.layer_precisions == {"gru": "dynamic_int8", "head": "dynamic_int8"}
    # The parity reference computes the GRU step by step, each step's input and hidden state rounded as
    # XNNPACK rounds them: the file to float rounding (with its weights alone simulated, about 1e-2 of the logits away).
    logits = LiteRTModel(path)(images.numpy())
    assert report.parity.max_logit_diff_lsb < 1e-4 * np.abs(logits).max()


@pytest.mark.parametrize("precision, message", [
    ("dynamic_int8", "dynamic_int8 on depthwise conv.* depthwise: XNNPACK has no dynamic-range depthwise kernel"),
    ({"default": "fp32", "classifier": "fp16"}, r"precision pattern\(s\) \['classifier'\] match no layer"),
    ({"default": "fp32", "head": "int8"}, "a layer's precision is one of dynamic_int8, fp16, fp32 .'int8' is the int8 file: only the default"),
    ("int4", "precision='int4' must be one of"),
    ({"default": "fp16", "(": "fp32"}, "not a valid regular expression"),
])
def test_a_precision_a_layer_cannot_have_is_refused_before_any_work(conv_mlp, tmp_path, precision, message):
    path = tmp_path / "m.tflite"
    with pytest.raises(SparseliteError, match=message):
        export_tflite(conv_mlp, torch.zeros(1, 1, 28, 28), path, precision=precision)
    assert not path.exists()


def test_int8_io_needs_the_fully_int8_file():
    with pytest.raises(SparseliteError, match="io_dtype='int8' needs precision='int8'"):
        ExportOptions(io_dtype="int8", precision="fp16")


@pytest.fixture(scope="module")
def pruned_conv_mlp(conv_mlp):
    """conv_mlp with its weights pruned to 80% by the pruner (masks on, as after a GMP run)."""
    import copy

    from sparselite.pruning.pruner import MagnitudePruner
    from sparselite.pruning.schedule import PolynomialDecay
    from sparselite.pruning.selection import LayerSelection

    model = copy.deepcopy(conv_mlp)
    pruner = MagnitudePruner(PolynomialDecay(final_sparsity=0.8, begin_step=0, end_step=1, frequency=1),
                             selection=LayerSelection(min_params=0, skip_depthwise=True))
    pruner.prepare(model)
    pruner.step(1)
    pruner.apply_masks()
    return model.eval()


def _sparse_weights(path) -> dict[str, str]:
    """Each sparse-stored constant's name -> the op that reads it (a DENSIFY, for every one here)."""
    model = read_model(path)
    subgraph = model.subgraphs[0]
    readers = {int(t): builtin_name(builtin_code(model, op)) for op in subgraph.operators for t in op.inputs}
    return {t.name.decode(): readers.get(i) for i, t in enumerate(subgraph.tensors) if t.sparsity is not None}


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_pruned_float_weights_are_stored_sparse_and_run_as_the_dense_file(pruned_conv_mlp, fmnist_heldout, tmp_path,
                                                                           precision):
    from conftest import xnnpack_partitions
    from sparselite.runtime.litert import LiteRTModel

    images = fmnist_heldout[0][:256]
    sparse, dense = tmp_path / "sparse.tflite", tmp_path / "dense.tflite"
    report = export_tflite(pruned_conv_mlp, images[:1], sparse, verify_data=[images], precision=precision)
    export_tflite(pruned_conv_mlp, images[:1], dense, verify_data=None, precision=precision, sparse=False)
    stored = _sparse_weights(sparse)
    assert {"hidden;1", "head;1"} <= set(stored) and set(stored.values()) == {"DENSIFY"}, stored
    # Each pruned weight is sparse unless that takes more bytes (the stem's 72 fp16 weights, with a DENSIFY).
    pruned = [e for e in report.sparse_encoding if e["sparsity"] > 0.5]
    assert len(pruned) == 4 and all((e["encoding"] != "dense") == (e["name"] in stored) for e in pruned)
    assert {e["reason"] for e in pruned if e["encoding"] == "dense"} <= {"sparse storage would not be smaller"}
    assert sparse.stat().st_size < 0.6 * dense.stat().st_size
    # XNNPACK densifies them at load and runs the whole graph, computing exactly what the dense file does.
    assert xnnpack_partitions(sparse) == 1
    assert (LiteRTModel(sparse)(images.numpy()) == LiteRTModel(dense)(images.numpy())).all()
    # Sparsity read back from the file's weights, through the DENSIFY (and the fp16 weights' DEQUANTIZE).
    assert {layer.layer for layer in report.layers} == {"stem", "conv", "hidden", "head"}
    for layer in report.layers:
        assert layer.sparsity_in_file == pytest.approx(layer.sparsity_in_training, abs=1e-6) and layer.sparsity_in_file >= 0.79
    assert not any("not read from the file" in note for note in report.notes)


def test_pruned_dynamic_range_weights_stay_dense_and_say_why(pruned_conv_mlp, fmnist_heldout, tmp_path):
    images = fmnist_heldout[0][:256]
    path = tmp_path / "m.tflite"
    report = export_tflite(pruned_conv_mlp, images[:1], path, verify_data=[images],
                           precision={"default": "dynamic_int8", "hidden": "fp16", "depthwise": "fp32"})
    assert list(_sparse_weights(path)) == ["hidden;1"]  # the fp16 weight
    kept = [e for e in report.sparse_encoding if e["reason"].startswith("dynamic-range")]
    assert {e["op"] for e in kept} == {"CONV_2D", "FULLY_CONNECTED"}
    assert any("dynamic-range weights stay dense" in note for note in report.notes)
    assert {layer.layer for layer in report.layers} == {"stem", "conv", "hidden", "head"}  # int8 ones too


class PatchEmbeddingNet(nn.Module):
    """A ViT's patch embedding (a conv whose kernel is its stride; padded: 4x4 patches of 32x32) between a stem
    and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.patches = nn.Conv2d(4, 16, 4, 4, padding=2)
        self.head = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.patches(F.relu(self.stem(x)))).flatten(1))


def test_a_patch_embedding_is_quantized_per_patch_as_the_file_runs_it(fmnist_train, fmnist_heldout, tmp_path):
    """Export writes the patch embedding as SPACE_TO_DEPTH and a 1x1 conv, which XNNPACK runs as a fully
    connected layer: its dynamic quantization takes one row per patch, not one per image, and so does the
    reference the file is checked against."""
    model = trained(PatchEmbeddingNet(), fmnist_train)
    path = tmp_path / "m.tflite"
    images = fmnist_heldout[0][:256]
    report = export_tflite(model, images[:1], path, verify_data=[images],
                           precision={"default": "dynamic_int8", "stem": "fp32"})  # the stem is a DEPTHWISE_CONV_2D
    assert weight_types(path)["CONV_2D"] == {TensorType.INT8}
    model_t = read_model(path)
    assert [builtin_name(builtin_code(model_t, op)) for op in model_t.subgraphs[0].operators].count("SPACE_TO_DEPTH") == 1
    # Float rounding flips a rounding of the input here and there; one row per image was 25x further off.
    with torch.no_grad():
        largest = float(model(images).abs().max())
    assert report.parity.max_logit_diff_lsb < 2e-4 * largest, (report.parity.max_logit_diff_lsb, largest)


@pytest.mark.parametrize("precision", ["fp32", "dynamic_int8"])
def test_a_fresh_torchvision_vit_exports_verified_despite_its_zero_head(precision, tmp_path):
    """torchvision initializes a ViT's head to zeros: every logit of every example ties. The gate compares the
    tied classes rather than refusing the file at 0% agreement."""
    import torchvision.models as tvm

    torch.manual_seed(0)
    vit = tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
                                num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    report = export_tflite(vit, x[:1], tmp_path / "vit.tflite", precision=precision, verify_data=[x])
    assert report.parity.ties_excluded == 4 and report.parity.top1_agreement == 1.0
    assert "same logits" in report.parity.degenerate_reference
