"""The file forms XNNPACK runs: a mean over NCHW's spatial axes reads the NHWC value (no TRANSPOSE), nearest
upsampling as copies and DEPTH_TO_SPACE, a transposed conv's activation fused into it, a max pool's
padding as a pad of whole rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ai_edge_litert import schema_py_generated as schema
from torch import nn
from torch.nn import functional as F

from conftest import pt2e_int8_tflite, xnnpack_partitions
from sparselite.export.graph_edit import axes_before, producers_of
from sparselite.export.xnnpack_forms import (
    fold_transposes_into_means, fuse_activations_into_transpose_convs, large_depthwise_kernels_on_tflite,
    left_to_tflite_on_purpose, nearest_upsampling_as_depth_to_space, split_wide_concatenations, use_xnnpack_forms,
    patch_convs_as_space_to_depth,
)
from sparselite.export.xnnpack_pool_forms import averages_as_depthwise_convs, crop_kernels_to_their_input, pads_as_rows
from sparselite.export.conversion import convert_with_ranges, float_model_for_export
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
    assert axes_before(np.array([0, 3, 1, 2]), np.array([2, 3])).tolist() == [1, 2]
    assert axes_before(np.array([0, 3, 1, 2]), np.array([-1, -2])).tolist() == [1, 2]
    # Kept axes H and W come out as (W, H): the mean of the untransposed value would be laid out differently.
    assert axes_before(np.array([0, 2, 1, 3]), np.array([3])) is None


class _Upsampling(nn.Module):
    """An FPN's top-down path: nearest upsampling by 2 and by 3, each added to a finer map."""

    def __init__(self) -> None:
        super().__init__()
        self.fine, self.coarse, self.coarsest = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fine = torch.relu(self.fine(x))
        coarse = torch.relu(self.coarse(fine))
        up = nn.functional.interpolate(self.coarsest(coarse), scale_factor=3.0, mode="nearest")
        return fine + nn.functional.interpolate(coarse + up, scale_factor=2.0, mode="nearest")


def _count(model_t, code: int) -> int:
    return sum(builtin_code(model_t, op) == code for op in model_t.subgraphs[0].operators)


def _int8_file(model: nn.Module, calibration: torch.Tensor, ranges: dict | None = None):
    return convert_with_ranges(float_model_for_export(model), (calibration[:1],), ranges or {}, [calibration])[0]


def _converted_file(model: nn.Module, x: torch.Tensor, precision: str):
    """The converter's file of ``model`` before any rewrite: int8 calibrated on ``x``, or fp32."""
    if precision == "int8":
        return _int8_file(model, x)
    import litert_torch

    return read_model(litert_torch.convert(model, (x[:1],)).model_content())


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_nearest_upsampling_becomes_copies_and_depth_to_space_with_the_same_values(precision, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 12, 12)
    model = _Upsampling().eval()
    model_t = _converted_file(model, x, precision)
    (tmp_path / "raw.tflite").write_bytes(write_model(model_t))
    assert _count(model_t, schema.BuiltinOperator.RESIZE_NEAREST_NEIGHBOR) == 2
    assert xnnpack_partitions(tmp_path / "raw.tflite") > 1  # XNNPACK does not take RESIZE_NEAREST_NEIGHBOR

    assert nearest_upsampling_as_depth_to_space(model_t) == 2
    split_wide_concatenations(model_t)  # the 9 copies of the 3x upsampling: XNNPACK concatenates 5 at most
    assert _count(model_t, schema.BuiltinOperator.RESIZE_NEAREST_NEIGHBOR) == 0
    assert _count(model_t, schema.BuiltinOperator.DEPTH_TO_SPACE) == 2
    (tmp_path / "rewritten.tflite").write_bytes(write_model(model_t))
    assert xnnpack_partitions(tmp_path / "rewritten.tflite") == 1
    raw, rewritten = LiteRTModel(tmp_path / "raw.tflite"), LiteRTModel(tmp_path / "rewritten.tflite")
    np.testing.assert_array_equal(raw(x.numpy()), rewritten(x.numpy()))


def test_a_transposed_convs_activation_is_fused_into_it(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 4, 6, 6)
    model = nn.Sequential(nn.ConvTranspose2d(4, 8, 2, 2), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    # Ranges as QAT learns them: the transposed conv's (its chain's, after the ReLU) is the ReLU's too.
    model_t = _int8_file(model, x, {"": (-4.0, 4.0), "0": (0.0, 3.0), "2": (-3.0, 3.0)})
    (tmp_path / "raw.tflite").write_bytes(write_model(model_t))
    assert _count(model_t, schema.BuiltinOperator.RELU) == 1  # litert-torch's int8 conversion leaves it standalone

    assert fuse_activations_into_transpose_convs(model_t) == 1
    assert _count(model_t, schema.BuiltinOperator.RELU) == 0
    transposed = next(op for op in model_t.subgraphs[0].operators if builtin_code(model_t, op) == schema.BuiltinOperator.TRANSPOSE_CONV)
    assert transposed.builtinOptions.fusedActivationFunction == schema.ActivationFunctionType.RELU
    (tmp_path / "fused.tflite").write_bytes(write_model(model_t))
    raw, fused = LiteRTModel(tmp_path / "raw.tflite"), LiteRTModel(tmp_path / "fused.tflite")
    np.testing.assert_array_equal(raw(x.numpy()), fused(x.numpy()))  # the ReLU kept its input's grid here


class _Averages(nn.Module):
    """The averages export rewrites: DenseNet's transition (a 2x2 average pool), a padded 3x3 pool, a
    squeeze-excite's squeeze over 4x4 (keeping dims) and a classifier's global mean over 2x2 written
    against NCHW; and one it keeps, a mean over 7x7 (49 values)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.mid, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, 2, 1), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))  # 14x14
        wide = x.mean((2, 3), keepdim=True)  # 49 values: stays a MEAN
        x = nn.functional.avg_pool2d(nn.functional.avg_pool2d(x, 2), 3, 1, 1) + wide  # 7x7
        x = self.mid(x)  # 4x4, no ReLU: a zero point inside the range (ties go either way)
        x = x * torch.sigmoid(x.mean((2, 3), keepdim=True))
        x = nn.functional.avg_pool2d(x, 2)  # 2x2
        return self.fc(x.mean((2, 3)))


def test_small_averages_become_depthwise_convs_that_round_the_integers_mean(tmp_path):
    from sparselite.runtime.op_cost import ops_alone

    torch.manual_seed(0)
    x = torch.randn(8, 3, 14, 14)
    model_t = _int8_file(_Averages().eval(), x)
    (tmp_path / "raw.tflite").write_bytes(write_model(model_t))
    assert _count(model_t, schema.BuiltinOperator.AVERAGE_POOL_2D) == 3
    assert xnnpack_partitions(tmp_path / "raw.tflite") > 1  # XNNPACK leaves int8 AVERAGE_POOL_2D to TFLite
    means = _count(model_t, schema.BuiltinOperator.MEAN)

    assert averages_as_depthwise_convs(model_t) == 3 + means - 1
    assert _count(model_t, schema.BuiltinOperator.AVERAGE_POOL_2D) == 0
    assert _count(model_t, schema.BuiltinOperator.MEAN) == 1  # the 7x7 one
    (tmp_path / "rewritten.tflite").write_bytes(write_model(model_t))
    assert xnnpack_partitions(tmp_path / "rewritten.tflite") == 1
    LiteRTModel(tmp_path / "rewritten.tflite")(x.numpy())  # runs, NHWC-transposed mean included

    # Each conv, cut out and fed every int8 value: the integers' mean rounded half to even, then the zero point.
    graph = model_t.subgraphs[0]
    rng = np.random.default_rng(0)
    checked, ties_the_mean_rounds_otherwise = 0, 0
    for index, op in enumerate(graph.operators):
        if builtin_code(model_t, op) != schema.BuiltinOperator.DEPTHWISE_CONV_2D or graph.tensors[op.inputs[1]].name[-5:] != b"_ones":
            continue
        source = graph.tensors[op.inputs[0]]
        (tmp_path / "conv.tflite").write_bytes(ops_alone(model_t, [index]))
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(tmp_path / "conv.tflite"), num_threads=1)
        interpreter.allocate_tensors()
        q = rng.integers(-128, 128, [int(d) for d in source.shape]).astype(np.int8)
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], q)
        interpreter.invoke()
        got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).astype(np.int64)
        zero_point = int(source.quantization.zeroPoint[0])
        options = op.builtinOptions
        kh, kw = (int(d) for d in graph.tensors[op.inputs[1]].shape[1:3])
        windows = np.lib.stride_tricks.sliding_window_view(q.astype(np.int64) - zero_point, (kh, kw), axis=(1, 2))
        windows = windows[:, :: options.strideH, :: options.strideW]
        expected = np.round(windows.mean(axis=(-2, -1))) + zero_point  # numpy rounds half to even
        np.testing.assert_array_equal(got, np.clip(expected, -128, 127))
        ties_the_mean_rounds_otherwise += int((np.round(windows.mean(axis=(-2, -1)) + zero_point) != expected).sum())
        checked += 1
    assert checked == 5
    assert ties_the_mean_rounds_otherwise > 0  # an odd zero point: MEAN's rule would have failed this


def test_upstream_xnnpack_does_not_delegate_int8_average_pooling(tmp_path):
    """docs/upstream/xnnpack_int8_average.md: when this fails, XNNPACK delegates int8 AVERAGE_POOL_2D."""
    from sparselite.tflite.flatbuffer import append_tensor, operator_code_index

    def one_pool(tensor_type: int) -> bytes:
        model_t = schema.ModelT()
        model_t.version, model_t.buffers, model_t.operatorCodes = 3, [schema.BufferT()], []
        model_t.subgraphs = [schema.SubGraphT()]
        model_t.subgraphs[0].tensors, model_t.subgraphs[0].operators = [], []
        quantization = None
        if tensor_type == schema.TensorType.INT8:
            quantization = schema.QuantizationParametersT()
            quantization.scale, quantization.zeroPoint = np.array([0.05], np.float32), np.array([3], np.int64)
        source = append_tensor(model_t, [1, 8, 8, 16], tensor_type, b"x", quantization)
        target = append_tensor(model_t, [1, 4, 4, 16], tensor_type, b"y", quantization)
        pool = schema.OperatorT()
        pool.opcodeIndex = operator_code_index(model_t, schema.BuiltinOperator.AVERAGE_POOL_2D)
        model_t.operatorCodes[pool.opcodeIndex].version = 2 if quantization else 1
        pool.inputs, pool.outputs = [source], [target]
        options = schema.Pool2DOptionsT()
        options.padding, options.strideH, options.strideW, options.filterHeight, options.filterWidth = schema.Padding.VALID, 2, 2, 2, 2
        pool.builtinOptionsType, pool.builtinOptions = schema.BuiltinOptions.Pool2DOptions, options
        model_t.subgraphs[0].operators, model_t.subgraphs[0].inputs, model_t.subgraphs[0].outputs = [pool], [source], [target]
        return write_model(model_t)

    for tensor_type, partitions in ((schema.TensorType.FLOAT32, 1), (schema.TensorType.INT8, 0)):
        path = tmp_path / f"pool{tensor_type}.tflite"
        path.write_bytes(one_pool(tensor_type))
        assert xnnpack_partitions(path) == partitions


class _WideKernelsOnSmallMaps(nn.Module):
    """MobileNetV3's last blocks at 64x64: a 5x5 depthwise conv over a 2x2 map; a 3x3 conv over 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 16, 3, 4, 1)  # 8x8 -> 2x2
        self.depthwise = nn.Conv2d(16, 16, 5, padding=2, groups=16)
        self.squeeze = nn.Conv2d(16, 16, 2)  # -> 1x1
        self.conv = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.squeeze(torch.relu(self.depthwise(torch.relu(self.down(x)))))))


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_kernels_wider_than_their_input_uses_are_cropped_with_the_same_values(precision, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    model = _WideKernelsOnSmallMaps().eval()
    model_t = _converted_file(model, x, precision)
    (tmp_path / "raw.tflite").write_bytes(write_model(model_t))

    assert crop_kernels_to_their_input(model_t) == 2
    graph = model_t.subgraphs[0]
    kernels = sorted(tuple(int(d) for d in graph.tensors[op.inputs[1]].shape[1:3]) for op in graph.operators
                     if builtin_code(model_t, op) in (schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.DEPTHWISE_CONV_2D))
    assert kernels == [(1, 1), (2, 2), (3, 3), (3, 3)]  # the 5x5 over 2x2 kept its middle 3x3, the 3x3 over 1x1 its middle tap
    (tmp_path / "cropped.tflite").write_bytes(write_model(model_t))
    raw, cropped = LiteRTModel(tmp_path / "raw.tflite"), LiteRTModel(tmp_path / "cropped.tflite")
    if precision == "int8":  # the same int32 sums
        np.testing.assert_array_equal(raw(x.numpy()), cropped(x.numpy()))
    else:  # the same products; a kernel of another size may add them in another order
        np.testing.assert_allclose(raw(x.numpy()), cropped(x.numpy()), rtol=1e-5, atol=1e-6)
    assert crop_kernels_to_their_input(model_t) == 0  # nothing left to crop


class _PooledStem(nn.Module):
    """ResNet's and ShuffleNet's stem: a conv, a ReLU, a 3x3 max pool of stride 2 padded by 1. ``relu``
    False pools the conv's output itself (negative values too); ``pad_value`` pads the ReLU's output
    with that value first (``F.pad``), and the pool pads nothing."""

    def __init__(self, relu: bool = True, pad_value: float | None = None) -> None:
        super().__init__()
        self.stem, self.relu, self.pad_value = nn.Conv2d(3, 24, 3, 2, 1), relu, pad_value
        self.head = nn.Conv2d(24, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.relu(y) if self.relu else y
        if self.pad_value is not None:
            return self.head(F.max_pool2d(F.pad(y, (1, 1, 1, 1), value=self.pad_value), 3, 2))
        return self.head(F.max_pool2d(y, 3, 2, 1))


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_a_max_pools_padding_becomes_a_pad_of_whole_rows_that_xnnpack_takes(precision, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    model_t = _converted_file(_PooledStem().eval(), x, precision)
    (tmp_path / "raw.tflite").write_bytes(write_model(model_t))
    assert _count(model_t, schema.BuiltinOperator.PADV2) == 1  # the converter pads with the lowest value
    assert xnnpack_partitions(tmp_path / "raw.tflite") == 2  # XNNPACK 2.3 leaves PADV2 out

    assert pads_as_rows(model_t) == 1
    graph = model_t.subgraphs[0]
    pad = next(op for op in graph.operators if builtin_code(model_t, op) == schema.BuiltinOperator.PAD
               and len(graph.tensors[op.inputs[0]].shape) == 3)
    assert [int(d) for d in graph.tensors[pad.inputs[0]].shape] == [1, 16, 16 * 24]  # rows of W*C values
    (tmp_path / "rows.tflite").write_bytes(write_model(model_t))
    assert xnnpack_partitions(tmp_path / "rows.tflite") == 1
    raw, rows = LiteRTModel(tmp_path / "raw.tflite"), LiteRTModel(tmp_path / "rows.tflite")
    np.testing.assert_array_equal(raw(x.numpy()), rows(x.numpy()))  # a pad and a max pool compute exactly
    assert pads_as_rows(model_t) == 0


@pytest.mark.parametrize("precision", ["int8", "fp32"])
@pytest.mark.parametrize("stem", [{"relu": False}, {"pad_value": 0.5}], ids=["no_relu", "pad_value"])
def test_a_pad_whose_value_could_win_a_max_stays_as_it_is(precision, stem):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    model_t = _converted_file(_PooledStem(**stem).eval(), x, precision)
    # No ReLU: a zero could win the max at the border. A value above zero (fp32; the int8 converter pads
    # this one in NCHW, between two TRANSPOSEs): a zero would lose it.
    assert pads_as_rows(model_t) == 0
    assert _count(model_t, schema.BuiltinOperator.PADV2) == 1


class _MixedKernels(nn.Module):
    """MixNet's mixed depthwise conv (3x3 and 7x7 on two halves of the channels), then a 3x9 one: 9, 49 and
    27 taps, of which XNNPACK runs the last two far slower than TFLite's own kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 32, 1)
        self.small = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.large = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.wide = nn.Conv2d(32, 32, (3, 9), padding=(1, 4), groups=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.relu(self.expand(x)).split(16, dim=1)
        return self.wide(torch.relu(torch.cat([self.small(a), self.large(b)], dim=1)))


def _depthwise_weights(model_t) -> list[tuple[tuple[int, ...], bool]]:
    """(weight shape, whether the conv reads the constant itself) of each DEPTHWISE_CONV_2D."""
    graph = model_t.subgraphs[0]
    found = []
    for op in graph.operators:
        if builtin_code(model_t, op) == schema.BuiltinOperator.DEPTHWISE_CONV_2D:
            weight = graph.tensors[int(op.inputs[1])]
            found.append((tuple(int(d) for d in weight.shape), model_t.buffers[weight.buffer].data is not None))
    return sorted(found)


def test_forms_for_the_gpu_keep_every_depthwise_weight_constant():
    """The GPU accelerator takes constant weights only: a require_gpu export (and what float_fallback='xnnpack'
    times for it, islands.as_written) leaves large depthwise convs on their constants."""
    from sparselite.export.islands import as_written

    model = _MixedKernels().eval()
    model_t = _converted_file(model, torch.randn(4, 3, 12, 12), "int8")
    assert all(constant for _, constant in _depthwise_weights(as_written(model_t, keep_weights_constant=True)))
    assert not all(constant for _, constant in _depthwise_weights(as_written(model_t)))


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_depthwise_convs_of_more_than_25_taps_read_their_weights_at_run_time_with_the_same_values(precision, tmp_path):
    from sparselite.tflite.constant_values import weight_sparsity
    from sparselite.tflite.ops import op_precision

    torch.manual_seed(0)
    x = torch.randn(16, 3, 12, 12)
    model = _MixedKernels().eval()
    with torch.no_grad():
        model.large.weight[:, :, ::2] = 0  # pruned rows: the file's sparsity must still be read through the RESHAPE
    model_t = _converted_file(model, x, precision)
    (tmp_path / "raw.tflite").write_bytes(write_model(model_t))

    assert large_depthwise_kernels_on_tflite(model_t) == 2
    assert _depthwise_weights(model_t) == [((1, 3, 3, 16), True), ((1, 3, 9, 32), False), ((1, 7, 7, 16), False)]
    assert len(left_to_tflite_on_purpose(model_t)) == 4  # two convs and their RESHAPEs
    if precision == "int8":  # on purpose: float_fallback='xnnpack' must not keep them float
        from sparselite.export.islands import int8_ops_xnnpack_leaves_out

        assert not {item.op for item in int8_ops_xnnpack_leaves_out(model_t, model)} & {"DEPTHWISE_CONV_2D", "RESHAPE"}
    graph, producers = model_t.subgraphs[0], producers_of(model_t.subgraphs[0])
    for op in graph.operators:
        if builtin_code(model_t, op) == schema.BuiltinOperator.DEPTHWISE_CONV_2D:
            assert op_precision(model_t, graph, op, producers) == precision  # read through the RESHAPE
    (tmp_path / "rewritten.tflite").write_bytes(write_model(model_t))
    assert weight_sparsity(tmp_path / "rewritten.tflite") == weight_sparsity(tmp_path / "raw.tflite")
    assert max(weight_sparsity(tmp_path / "rewritten.tflite").values()) >= 4 / 7  # rows 0, 2, 4, 6 of 7

    raw, rewritten = LiteRTModel(tmp_path / "raw.tflite")(x.numpy()), LiteRTModel(tmp_path / "rewritten.tflite")(x.numpy())
    if precision == "fp32":
        np.testing.assert_allclose(rewritten, raw, rtol=1e-5, atol=1e-5)
    else:  # TFLite's kernel and XNNPACK's may round a half apart: at most one step of the output's grid
        output = graph.tensors[int(graph.outputs[0])]
        dequantize = producers[int(graph.outputs[0])]
        scale = float(graph.tensors[int(dequantize.inputs[0])].quantization.scale[0]) if output.type == schema.TensorType.FLOAT32 \
            else float(output.quantization.scale[0])
        assert np.abs(rewritten - raw).max() <= scale * 1.001


def test_the_export_report_names_the_depthwise_convs_left_to_tflite(tmp_path):
    from sparselite import export_tflite

    torch.manual_seed(0)
    images = torch.randn(8, 3, 12, 12)
    report = export_tflite(_MixedKernels().eval(), images[:1], tmp_path / "m.tflite", calibration_data=[images],
                           verify_data=[images])
    (note,) = [n for n in report.notes if "TFLite's own kernel" in n]
    assert note.startswith("2 depthwise conv(s)") and note.endswith(("large, wide", "wide, large")), note


def test_a_patch_embedding_of_one_input_channel_keeps_its_depthwise_conv_on_xnnpack():
    """The converter writes a conv of one input channel as a depthwise conv with a channel multiplier: not the
    case measured slow, so it stays as it is."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    model_t = _converted_file(nn.Sequential(nn.Conv2d(1, 16, 7, 7), nn.ReLU()).eval(), x, "int8")
    assert _depthwise_weights(model_t) == [((1, 7, 7, 16), True)]
    assert large_depthwise_kernels_on_tflite(model_t) == 0


def test_upstream_xnnpack_runs_depthwise_convs_of_more_than_25_taps_slower_than_tflite(tmp_path):
    """docs/upstream/xnnpack_large_depthwise.md: when this fails, XNNPACK's int8 7x7 depthwise conv is no
    longer several times slower than TFLite's builtin kernel (13x measured), and
    ``large_depthwise_kernels_on_tflite`` can go."""
    import time

    torch.manual_seed(0)
    x = torch.randn(16, 96, 16, 16)
    model_t = _int8_file(nn.Conv2d(96, 96, 7, padding=3, groups=96).eval(), x)
    (tmp_path / "xnnpack.tflite").write_bytes(write_model(model_t))
    assert large_depthwise_kernels_on_tflite(model_t) == 1
    (tmp_path / "tflite.tflite").write_bytes(write_model(model_t))
    runtimes = {name: LiteRTModel(tmp_path / f"{name}.tflite", threads=1) for name in ("xnnpack", "tflite")}
    one = x[:1].numpy()
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in range(15):  # interleaved, medians: the machine is shared
        for name, runtime in runtimes.items():
            started = time.perf_counter()
            for _ in range(5):
                runtime(one)
            times[name].append(time.perf_counter() - started)
    xnnpack, tflite = (float(np.median(times[name])) for name in ("xnnpack", "tflite"))
    assert xnnpack > 3 * tflite, (xnnpack, tflite)


@pytest.mark.parametrize("kernel, padding, stride, size", [
    (7, 3, 1, (12, 12)),  # 49 taps
    (7, 3, 1, (4, 4)),  # all 49 reach the input
    (7, 3, 1, (3, 3)),  # cropped to 5x5: 25
    (7, 3, 1, (2, 2)),  # cropped to 3x3
    (7, 3, 1, (2, 12)),  # cropped to 3x7: 21
    (7, 0, 1, (12, 12)),  # no SAME padding: nothing cropped
    (7, 3, 2, (12, 12)),  # strided: nothing cropped
    ((3, 9), (1, 4), 1, (12, 12)),  # 27
    (5, 2, 1, (12, 12)),  # 25
    (31, 15, 1, (64,)),  # a Conformer's depthwise Conv1d: a conv of one row in the file
    (31, 15, 1, (8,)),  # cropped to 15
    (27, 0, 1, (64,)),
    (7, "tf_same", 1, (12, 12)),  # timm's Conv2dSame: a PAD, then a conv that reads all 49 taps
    (7, "tf_same", 1, (2, 2)),
])
def test_training_and_export_agree_on_which_depthwise_convs_run_on_tflites_kernel(kernel, padding, stride, size):
    """QAT computes these convs with TFLite's requantization (``int8_layer``): it must pick the very convs
    export leaves to TFLite's kernel, after cropping the taps that read only padding."""
    from model_blocks import TFSameConv2d
    from sparselite.quantization.library_layers import pad_tf_same
    from sparselite.quantization.qat import on_tflite_depthwise_kernel

    x = torch.randn(1, 8, *size)
    if padding == "tf_same":
        conv = TFSameConv2d(8, 8, kernel, stride, groups=8).eval()
        on_tflite = on_tflite_depthwise_kernel(conv, pad_tf_same(conv, x), padded_before=True)
    else:
        conv = (nn.Conv1d if len(size) == 1 else nn.Conv2d)(8, 8, kernel, stride, padding, groups=8).eval()
        on_tflite = on_tflite_depthwise_kernel(conv, x, padded_before=False)
    model_t = _converted_file(conv, x, "fp32")
    use_xnnpack_forms(model_t)
    assert on_tflite == bool(left_to_tflite_on_purpose(model_t))


class _PatchEmbeddings(nn.Module):
    """Patch embeddings (4x4 over 16x16, 2x2 after it, 2x2 over the 18x18 padded input: the converter writes
    its padding as a PAD) and convs that are none: overlapping windows, windows that do not tile the input."""

    def __init__(self) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, 16, 4, 4)
        self.overlapping = nn.Conv2d(3, 8, 4, 2)
        self.untiled = nn.Conv2d(3, 8, 3, 3)  # 16 is no multiple of 3
        self.padded = nn.Conv2d(3, 8, 2, 2, padding=1)
        self.merge = nn.Conv2d(16, 8, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [F.adaptive_avg_pool2d(torch.relu(conv(x)), 1) for conv in (self.overlapping, self.untiled, self.padded)]
        merged = F.adaptive_avg_pool2d(self.merge(torch.relu(self.patches(x))), 1)
        return torch.cat([merged, *pooled], dim=1).flatten(1)


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_patch_embeddings_become_space_to_depth_and_a_pointwise_conv_with_the_same_values(precision, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 16, 16)
    model_t = _converted_file(_PatchEmbeddings().eval(), x, precision)
    (tmp_path / "raw.tflite").write_bytes(write_model(model_t))

    assert patch_convs_as_space_to_depth(model_t) == 3
    (tmp_path / "rewritten.tflite").write_bytes(write_model(model_t))
    graph = model_t.subgraphs[0]
    assert _count(model_t, schema.BuiltinOperator.SPACE_TO_DEPTH) == 3
    pointwise = sorted(tuple(int(d) for d in graph.tensors[int(op.inputs[1])].shape) for op in graph.operators
                       if builtin_code(model_t, op) == schema.BuiltinOperator.CONV_2D
                       and graph.tensors[int(op.inputs[1])].shape[1] == 1)
    assert pointwise == [(8, 1, 1, 12), (8, 1, 1, 64), (16, 1, 1, 48)]
    assert xnnpack_partitions(tmp_path / "rewritten.tflite") == 1
    raw, rewritten = LiteRTModel(tmp_path / "raw.tflite")(x.numpy()), LiteRTModel(tmp_path / "rewritten.tflite")(x.numpy())
    if precision == "int8":  # the same int32 sums, requantized alike
        np.testing.assert_array_equal(rewritten, raw)
    else:  # the same products, summed in another order
        np.testing.assert_allclose(rewritten, raw, rtol=1e-5, atol=1e-5)
