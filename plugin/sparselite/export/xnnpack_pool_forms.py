"""XNNPACK forms of averages, wide kernels and pads (part of ``xnnpack_forms.use_xnnpack_forms``).

- ``averages_as_depthwise_convs`` (int8 only): a MEAN or AVERAGE_POOL_2D over a window of at most 25
  values as a DEPTHWISE_CONV_2D of ones (docs/upstream/xnnpack_int8_average.md). It rounds the tied
  means of an odd zero point the other way from MEAN, and training rounds as it does.
- ``crop_kernels_to_their_input``: a stride-1 conv's kernel cut to the taps that can reach its input.
- ``pads_as_rows``: a pad that XNNPACK runs apart from any conv (a max pool's) as a pad of whole rows,
  and a max pool's lowest-value PADV2 over a ReLU's output as a PAD, which XNNPACK takes.
"""

from __future__ import annotations

import copy

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from sparselite.export.graph_edit import WEIGHT_DTYPES, axes_before, constant_ints, producers_of, readers_of, reshape_op, same_quantization
from sparselite.quantization.spec import average_as_depthwise, kernel_taps_used
from sparselite.tflite.flatbuffer import append_tensor, builtin_code, operator_code_index


def _average_window(model: schema.ModelT, op: schema.OperatorT, producers: dict[int, schema.OperatorT]):
    """(input tensor, kernel (h, w), strides, fused activation) of an int8 MEAN over the spatial axes of
    a 4-D NHWC value (read through a TRANSPOSE to NCHW, if the mean reads one) or an AVERAGE_POOL_2D
    with VALID padding; None for any other op."""
    subgraph = model.subgraphs[0]
    code = builtin_code(model, op)
    if code == schema.BuiltinOperator.AVERAGE_POOL_2D:
        options = op.builtinOptions
        if options is None or options.padding != schema.Padding.VALID:
            return None
        return (int(op.inputs[0]), (options.filterHeight, options.filterWidth), (options.strideH, options.strideW),
                options.fusedActivationFunction)
    if code != schema.BuiltinOperator.MEAN:
        return None
    source, axes = int(op.inputs[0]), constant_ints(model, int(op.inputs[1]))
    if axes is None or len(subgraph.tensors[source].shape) != 4:
        return None
    producer = producers.get(source)
    if producer is not None and builtin_code(model, producer) == schema.BuiltinOperator.TRANSPOSE:
        perm = constant_ints(model, int(producer.inputs[1]))
        before = None if perm is None else axes_before(perm, axes)
        if before is not None and before.tolist() == [1, 2]:
            source, axes = int(producer.inputs[0]), before
    if sorted(int(a) % 4 for a in axes) != [1, 2]:
        return None
    _, h, w, _ = (int(d) for d in subgraph.tensors[source].shape)
    return source, (h, w), (1, 1), schema.ActivationFunctionType.NONE


def _depthwise_of_ones(model: schema.ModelT, window, source: schema.TensorT, name: bytes) -> schema.OperatorT:
    """A DEPTHWISE_CONV_2D of int8 ones with the scale 1 / window and a zero bias over ``window``'s input
    (its outputs are left to the caller)."""
    (kh, kw), count = window[1], window[1][0] * window[1][1]
    c = int(source.shape[3])
    input_scale = np.float32(source.quantization.scale[0])
    # One scale for every channel (per-channel tables would add 12 bytes a channel to the file).
    weights = schema.QuantizationParametersT()
    weights.scale = np.array([np.float32(1.0) / np.float32(count)], dtype=np.float32)
    weights.zeroPoint = np.zeros(1, dtype=np.int64)
    bias = schema.QuantizationParametersT()
    bias.scale = (input_scale * weights.scale).astype(np.float32)
    bias.zeroPoint = np.zeros(1, dtype=np.int64)
    conv = schema.OperatorT()
    conv.opcodeIndex = operator_code_index(model, schema.BuiltinOperator.DEPTHWISE_CONV_2D)
    code = model.operatorCodes[conv.opcodeIndex]
    code.version = max(code.version, 3)  # int8
    conv.inputs = [window[0],
                   append_tensor(model, [1, kh, kw, c], schema.TensorType.INT8, name + b"_ones", weights,
                                 data=np.ones((1, kh, kw, c), dtype=np.int8).tobytes()),
                   append_tensor(model, [c], schema.TensorType.INT32, name + b"_zero_bias", bias,
                                 data=np.zeros(c, dtype="<i4").tobytes())]
    options = schema.DepthwiseConv2DOptionsT()
    options.padding, (options.strideH, options.strideW) = schema.Padding.VALID, window[2]
    options.depthMultiplier, options.dilationHFactor, options.dilationWFactor = 1, 1, 1
    options.fusedActivationFunction = window[3]
    conv.builtinOptionsType, conv.builtinOptions = schema.BuiltinOptions.DepthwiseConv2DOptions, options
    return conv


def averages_as_depthwise_convs(model: schema.ModelT) -> int:
    """Rewrite, in place, each int8 average over a window of at most 25 values that keeps its input's
    grid (``spec.average_as_depthwise``): a MEAN over a 4-D value's spatial axes (a global pooling, a
    squeeze-excite's squeeze), an AVERAGE_POOL_2D with VALID padding (DenseNet's transitions). Each
    becomes a DEPTHWISE_CONV_2D of int8 ones with the scale 1 / window and a zero bias, and a RESHAPE
    where the mean's output has another shape. XNNPACK runs the int8 MEAN as int32 sums requantized by
    a scalar loop, and leaves int8 AVERAGE_POOL_2D to TFLite's kernel, splitting the graph. The conv
    rounds the integers' mean half to even and adds the zero point (the MEAN adds it first): training
    rounds as the file does (``int8_rounding.mean_on_input_grid``). Only the int8 file: XNNPACK's fp32
    MEAN is as fast as the conv or faster. The file grows by the ones and the zero bias (window x
    channels + 4 x channels bytes). Returns how many."""
    subgraph = model.subgraphs[0]
    producers = producers_of(subgraph)
    operators, bypassed, rewritten = [], set(), 0
    for op in subgraph.operators:
        window = _average_window(model, op, producers)
        source = None if window is None else subgraph.tensors[window[0]]
        target = subgraph.tensors[int(op.outputs[0])]
        if (window is None or source.type != schema.TensorType.INT8 or not same_quantization(source, target)
                or not average_as_depthwise(window[1][0] * window[1][1])):
            operators.append(op)
            continue
        conv = _depthwise_of_ones(model, window, source, target.name or b"average")
        (kh, kw), (n, h, w, c) = window[1], (int(d) for d in source.shape)
        shape = [n, (h - kh) // window[2][0] + 1, (w - kw) // window[2][1] + 1, c]
        if [int(d) for d in target.shape] == shape:
            conv.outputs = [int(op.outputs[0])]
            operators.append(conv)
        else:  # a mean that drops the reduced axes, or one read through a transpose to NCHW
            conv.outputs = [append_tensor(model, shape, target.type, (target.name or b"average") + b"_pooled", copy.deepcopy(target.quantization))]
            operators.extend([conv, reshape_op(model, conv.outputs[0], int(op.outputs[0]))])
        if int(op.inputs[0]) != window[0]:
            bypassed.add(int(op.inputs[0]))
        rewritten += 1
    # A transpose the mean read through, read by nothing else now, goes.
    read = {int(t) for op in operators for t in (op.inputs if op.inputs is not None else [])} | {int(t) for t in subgraph.outputs}
    subgraph.operators = [op for op in operators if not (int(op.outputs[0]) in bypassed and int(op.outputs[0]) not in read)]
    return rewritten


def crop_kernels_to_their_input(model: schema.ModelT) -> int:
    """Crop, in place, the kernel of each stride-1 CONV_2D or DEPTHWISE_CONV_2D with SAME padding that
    is wider than its input can use: a kernel of odd size k over a map of n rows (or columns) reaches
    input rows only with its middle 2n - 1 taps, the others read padding at every output position (a
    5x5 depthwise conv over a 2x2 map, as MobileNetV3's and EfficientNet's last blocks run at 64x64:
    16 of its 25 taps). Padding adds nothing (int8: the zero point, minus the zero point; fp32: 0): the
    int8 conv computes the same int32 sums, the fp32 one the same products (a kernel of another size
    may add them in another order). The weight tensor keeps its name, and the file holds only the taps
    kept (the report's sparsity of that layer is theirs). Returns how many."""
    subgraph = model.subgraphs[0]
    convolutions = (schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.DEPTHWISE_CONV_2D)
    readers = readers_of(subgraph)
    cropped = 0
    for op in subgraph.operators:
        options = op.builtinOptions
        if (builtin_code(model, op) not in convolutions or options is None or options.padding != schema.Padding.SAME
                or (options.strideH, options.strideW, options.dilationHFactor, options.dilationWFactor) != (1, 1, 1, 1)):
            continue
        source, weight = subgraph.tensors[int(op.inputs[0])], subgraph.tensors[int(op.inputs[1])]
        buffer = model.buffers[weight.buffer]
        if (buffer.data is None or weight.sparsity is not None or weight.type not in WEIGHT_DTYPES
                or len(source.shape) != 4 or len(readers.get(int(op.inputs[1]), [])) != 1):
            continue
        (_, kh, kw, _), (_, h, w, _) = ([int(d) for d in weight.shape], [int(d) for d in source.shape])
        used_h, used_w = kernel_taps_used(kh, h), kernel_taps_used(kw, w)
        if kh % 2 == 0 or kw % 2 == 0 or (used_h, used_w) == (kh, kw):
            continue
        top, left = (kh - used_h) // 2, (kw - used_w) // 2
        values = np.asarray(buffer.data, dtype=np.uint8).view(WEIGHT_DTYPES[weight.type]).reshape([int(d) for d in weight.shape])
        kept = np.ascontiguousarray(values[:, top : top + used_h, left : left + used_w, :])
        buffer.data = np.frombuffer(kept.tobytes(), dtype=np.uint8)
        weight.shape = np.array(kept.shape, dtype=np.int32)
        cropped += 1
    return cropped


_NON_NEGATIVE_ACTIVATIONS = (schema.ActivationFunctionType.RELU, schema.ActivationFunctionType.RELU6)


def _holds_nothing_below_zero(model: schema.ModelT, tensor: int, producers: dict[int, schema.OperatorT]) -> bool:
    """Whether no value of ``tensor`` is below the value PAD pads it with: int8, a zero point that is
    the lowest code (a ReLU's output); fp32, a producer whose fused activation is a ReLU."""
    source = model.subgraphs[0].tensors[tensor]
    if source.type == schema.TensorType.INT8:
        quantization = source.quantization
        return quantization is not None and quantization.zeroPoint is not None and len(quantization.zeroPoint) == 1 \
            and int(quantization.zeroPoint[0]) == -128
    producer = producers.get(tensor)
    if producer is None:
        return False
    if builtin_code(model, producer) in (schema.BuiltinOperator.RELU, schema.BuiltinOperator.RELU6):
        return True
    return getattr(producer.builtinOptions, "fusedActivationFunction", None) in _NON_NEGATIVE_ACTIVATIONS


def _ignored_by_max_pools(model: schema.ModelT, users: list[int], paddings: np.ndarray) -> bool:
    """Whether every reader is a VALID max pool each of whose windows reaches the map (a padding
    narrower than the window), so that a padding value below every value of the map is never the max."""
    subgraph = model.subgraphs[0]
    for index in users:
        pool = subgraph.operators[index]
        options = pool.builtinOptions
        if (builtin_code(model, pool) != schema.BuiltinOperator.MAX_POOL_2D or options.padding != schema.Padding.VALID
                or paddings[1].max() >= options.filterHeight or paddings[2].max() >= options.filterWidth):
            return False
    return True


def _pads_only_rows_and_columns(model: schema.ModelT, op: schema.OperatorT, users: list[int],
                                producers: dict[int, schema.OperatorT]) -> np.ndarray | None:
    """The (4, 2) paddings of a PAD or PADV2 of an NHWC map that pads its height and width only, and
    that a PAD computes: a PADV2 whose value is PAD's (the zero point, or 0.0), or a lower one that only
    max pools read, over a map that holds nothing below PAD's value (a max pool ignores a padding value
    that no value of the map is below); None for any other pad."""
    subgraph = model.subgraphs[0]
    source = subgraph.tensors[int(op.inputs[0])]
    paddings = constant_ints(model, int(op.inputs[1]))
    if (len(source.shape) != 4 or paddings is None or paddings.size != 8
            or subgraph.tensors[int(op.inputs[1])].type != schema.TensorType.INT32):
        return None
    paddings = paddings.reshape(4, 2)
    if paddings[0].any() or paddings[3].any():
        return None
    if len(op.inputs) < 3:
        return paddings
    data = model.buffers[subgraph.tensors[int(op.inputs[2])].buffer].data
    if data is None or source.type not in WEIGHT_DTYPES:
        return None
    value = np.asarray(data, dtype=np.uint8).view(WEIGHT_DTYPES[source.type]).reshape(-1)
    zero_point = source.quantization.zeroPoint if source.quantization is not None else None
    zero = int(zero_point[0]) if zero_point is not None and len(zero_point) else 0
    if value.size != 1 or value[0] > zero:
        return None
    if value[0] == zero or (_ignored_by_max_pools(model, users, paddings)
                            and _holds_nothing_below_zero(model, int(op.inputs[0]), producers)):
        return paddings
    return None


def pads_as_rows(model: schema.ModelT) -> int:
    """Rewrite, in place, each pad of an NHWC map's height and width that XNNPACK does not fuse into a
    convolution, such as a max pool's padding after a ReLU (ResNet's and ShuffleNet's stems). XNNPACK
    copies such a pad one pixel at a time, C values each: 8% of shufflenet_v2_x1_0's int8 time at
    64x64, for its 32x32x24 stem. The same pad of the map reshaped to H rows of W*C values (each row
    padded by left*C and right*C) copies whole rows. The max pool's pad is a PADV2 of the lowest value,
    which XNNPACK 2.3 leaves out (it splits the graph); over a ReLU's output a PAD computes the same
    pool, and XNNPACK takes it. Every value stays as it was. Returns how many."""
    subgraph = model.subgraphs[0]
    readers = readers_of(subgraph)
    producers = producers_of(subgraph)
    convolutions = (schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.DEPTHWISE_CONV_2D)
    pads = (schema.BuiltinOperator.PAD, schema.BuiltinOperator.PADV2)
    operators, rewritten = [], 0
    for op in subgraph.operators:
        users = readers.get(int(op.outputs[0]), []) if builtin_code(model, op) in pads else []
        paddings = _pads_only_rows_and_columns(model, op, users, producers) if users else None
        if paddings is None or (len(users) == 1 and builtin_code(model, subgraph.operators[users[0]]) in convolutions):
            operators.append(op)  # XNNPACK pads a convolution's input as part of it
            continue
        source_index, target = int(op.inputs[0]), int(op.outputs[0])
        source, padded = subgraph.tensors[source_index], subgraph.tensors[target]
        (n, h, w, c), (_, padded_h, padded_w, _) = [int(d) for d in source.shape], [int(d) for d in padded.shape]
        rows = append_tensor(model, [n, h, w * c], source.type, (source.name or b"") + b"_rows",
                             copy.deepcopy(source.quantization))
        padded_rows = append_tensor(model, [n, padded_h, padded_w * c], source.type, (padded.name or b"") + b"_rows",
                                    copy.deepcopy(padded.quantization))
        row_paddings = np.array([paddings[0], paddings[1], paddings[2] * c], dtype="<i4")
        op.opcodeIndex = operator_code_index(model, schema.BuiltinOperator.PAD)
        op.inputs = [rows, append_tensor(model, [3, 2], schema.TensorType.INT32, b"row_paddings",
                                         data=row_paddings.tobytes())]
        op.builtinOptionsType, op.builtinOptions = schema.BuiltinOptions.PadOptions, schema.PadOptionsT()
        op.outputs = [padded_rows]
        operators += [reshape_op(model, source_index, rows), op, reshape_op(model, padded_rows, target)]
        rewritten += 1
    subgraph.operators = operators
    return rewritten
