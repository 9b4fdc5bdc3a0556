"""Graph forms XNNPACK runs faster, or at all: changes to a converted file that leave every value it
computes as it was (but one, whose rounding training follows). Applied to the int8 and the fp32
exports alike, so that their latency ratio compares quantization only; the one that touches int8 ops
only is there because XNNPACK's fp32 op is already as fast.

- ``fold_transposes_into_means``: litert-torch runs the graph in NHWC, but a mean that torch code
  writes over NCHW's spatial axes (``x.mean((2, 3))``, ShuffleNet's head) comes out as TRANSPOSE to
  NCHW, then MEAN over axes 2 and 3. The mean of the untransposed value over the same axes (1 and 2
  in NHWC) computes the same numbers in the same output layout, without the transpose: on
  shufflenet_v2_x1_0 at 64x64, XNNPACK ran the int8 file 4% faster and the fp32 file 1.6% (the same
  files with and without the transpose, interleaved, 1 thread). The int8 outputs are identical: the
  mean keeps its input's scale, and the transpose changed none of its integers.
- ``split_wide_concatenations``: XNNPACK (ai-edge-litert 2.3) delegates a CONCATENATION of at most 5
  inputs (measured: 5 inputs, one partition; 6, two); a wider one (DenseNet's, of every earlier
  layer's output; a decomposed adaptive pooling's) runs on TFLite's own kernel and splits the graph.
  It becomes a tree of concatenations of at most 5. Every input of an int8 concatenation is on its
  output's scale (TFLite requires it), so the groups take that scale and copy integers unchanged.
- ``nearest_upsampling_as_depth_to_space``: RESIZE_NEAREST_NEIGHBOR, which XNNPACK delegates in
  neither precision, as copies and DEPTH_TO_SPACE.
- ``fuse_activations_into_transpose_convs``: the RELU that litert-torch's int8 conversion leaves after
  a TRANSPOSE_CONV, as its fused activation.
- ``averages_as_depthwise_convs`` (int8 only): a MEAN or AVERAGE_POOL_2D over a window of at most 25
  values as a DEPTHWISE_CONV_2D of ones (docs/upstream/xnnpack_int8_average.md). It rounds the tied
  means of an odd zero point the other way from MEAN, and training rounds as it does.
- ``crop_kernels_to_their_input``: a stride-1 conv's kernel cut to the taps that can reach its input.
- ``pads_as_rows``: a pad that XNNPACK runs apart from any conv (a max pool's) as a pad of whole rows,
  and a max pool's lowest-value PADV2 over a ReLU's output as a PAD, which XNNPACK takes.
``benchmarks/layout_forms.py`` times these with and without.
"""

from __future__ import annotations

import copy

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from sparselite.quantization.spec import average_as_depthwise
from sparselite.tflite.flatbuffer import append_tensor, builtin_code, operator_code_index


def _constant(model: schema.ModelT, tensor: int) -> np.ndarray | None:
    data = model.buffers[model.subgraphs[0].tensors[tensor].buffer].data
    return None if data is None else np.asarray(data, dtype=np.uint8).view(np.int32)


def _readers(subgraph: schema.SubGraphT) -> dict[int, list[int]]:
    readers: dict[int, list[int]] = {}
    for index, op in enumerate(subgraph.operators):
        for tensor in op.inputs if op.inputs is not None else []:
            readers.setdefault(int(tensor), []).append(index)
    return readers


def _producers(subgraph: schema.SubGraphT) -> dict[int, schema.OperatorT]:
    return {int(tensor): op for op in subgraph.operators for tensor in op.outputs}


def _axes_before(perm: np.ndarray, axes: np.ndarray) -> np.ndarray | None:
    """The axes of the transpose's input that ``axes`` of its output are, when the axes the mean
    keeps stay in the same order (so the mean's output is laid out the same); None otherwise."""
    rank = len(perm)
    reduced = {int(a) % rank for a in axes}
    kept = [int(perm[a]) for a in range(rank) if a not in reduced]
    if kept != sorted(kept):
        return None
    return np.array(sorted(int(perm[a]) for a in reduced), dtype=np.int32)


def fold_transposes_into_means(model: schema.ModelT) -> int:
    """Make every MEAN that reads a TRANSPOSE read the transpose's input instead (with its axes
    permuted), in place, where the transpose has no other reader and the mean keeps no reduced
    dimension; the transposes go. Returns how many."""
    subgraph = model.subgraphs[0]
    readers = _readers(subgraph)
    outputs = {int(t) for t in subgraph.outputs}
    removed = set()
    for index, op in enumerate(subgraph.operators):
        if builtin_code(model, op) != schema.BuiltinOperator.TRANSPOSE or int(op.outputs[0]) in outputs:
            continue
        users = readers.get(int(op.outputs[0]), [])
        if len(users) != 1:
            continue
        mean = subgraph.operators[users[0]]
        if builtin_code(model, mean) != schema.BuiltinOperator.MEAN or getattr(mean.builtinOptions, "keepDims", False):
            continue
        perm, axes = _constant(model, int(op.inputs[1])), _constant(model, int(mean.inputs[1]))
        if perm is None or axes is None or int(mean.inputs[0]) != int(op.outputs[0]):
            continue
        before = _axes_before(perm, axes)
        if before is None:
            continue
        axes_index = append_tensor(model, [len(before)], schema.TensorType.INT32, b"mean_axes_before_transpose",
                                   data=before.astype("<i4").tobytes())
        mean.inputs = [int(op.inputs[0]), axes_index]
        removed.add(index)
    subgraph.operators = [op for index, op in enumerate(subgraph.operators) if index not in removed]
    return len(removed)


XNNPACK_MAX_CONCAT_INPUTS = 5


def split_wide_concatenations(model: schema.ModelT) -> int:
    """Make every CONCATENATION of more than ``XNNPACK_MAX_CONCAT_INPUTS`` inputs read concatenations
    of groups of them instead, in place; returns how many."""
    subgraph = model.subgraphs[0]
    operators, split = [], 0
    for op in subgraph.operators:
        parts = [] if op.inputs is None else [int(i) for i in op.inputs]
        if builtin_code(model, op) != schema.BuiltinOperator.CONCATENATION or len(parts) <= XNNPACK_MAX_CONCAT_INPUTS:
            operators.append(op)
            continue
        whole = subgraph.tensors[int(op.outputs[0])]
        axis = op.builtinOptions.axis % len(whole.shape)
        while len(parts) > XNNPACK_MAX_CONCAT_INPUTS:
            grouped = []
            for start in range(0, len(parts), XNNPACK_MAX_CONCAT_INPUTS):
                chunk = parts[start : start + XNNPACK_MAX_CONCAT_INPUTS]
                if len(chunk) > 1:
                    shape = [int(d) for d in subgraph.tensors[chunk[0]].shape]
                    shape[axis] = sum(int(subgraph.tensors[i].shape[axis]) for i in chunk)
                    group = schema.OperatorT()
                    group.opcodeIndex, group.inputs = op.opcodeIndex, chunk
                    name = (whole.name or b"") + f"_group{len(operators)}".encode()
                    group.outputs = [append_tensor(model, shape, whole.type, name, copy.deepcopy(whole.quantization))]
                    group.builtinOptionsType = schema.BuiltinOptions.ConcatenationOptions
                    group.builtinOptions = schema.ConcatenationOptionsT()
                    group.builtinOptions.axis = axis
                    operators.append(group)
                    chunk = list(group.outputs)
                grouped.extend(chunk)
            parts = grouped
        op.inputs = parts
        operators.append(op)
        split += 1
    subgraph.operators = operators
    return split


def _same_quantization(a: schema.TensorT, b: schema.TensorT) -> bool:
    def params(t):
        q = t.quantization
        if q is None or q.scale is None or not len(q.scale):
            return None
        return [float(v) for v in q.scale], [int(v) for v in q.zeroPoint]
    return a.type == b.type and params(a) == params(b)


def nearest_upsampling_as_depth_to_space(model: schema.ModelT) -> int:
    """Rewrite, in place, each RESIZE_NEAREST_NEIGHBOR that upsamples height and width by one integer
    factor k (torch's ``interpolate(mode="nearest")``, a U-Net's or an FPN's upsampling): XNNPACK
    (ai-edge-litert 2.3) delegates it in neither fp32 nor int8, so it ran on TFLite's kernel and split
    the graph. It becomes a CONCATENATION of k * k copies along the channels and a DEPTH_TO_SPACE of
    block k, which both run in XNNPACK: output pixel (h*k + i, w*k + j) reads channel block i*k + j, a
    copy of input pixel (h, w). Copies of integers: the same values, int8 or fp32. Returns how many."""
    subgraph = model.subgraphs[0]
    operators, rewritten = [], 0
    for op in subgraph.operators:
        if builtin_code(model, op) != schema.BuiltinOperator.RESIZE_NEAREST_NEIGHBOR:
            operators.append(op)
            continue
        source, target = subgraph.tensors[int(op.inputs[0])], subgraph.tensors[int(op.outputs[0])]
        options = op.builtinOptions
        (n, h, w, c), (_, out_h, out_w, _) = [int(d) for d in source.shape], [int(d) for d in target.shape]
        factor = out_h // h if h else 0
        # With an integer factor, half-pixel centers (as litert writes torch's "nearest") pick the same
        # pixel, floor((o + 0.5) / k) = floor(o / k); corners aligned would not.
        if (getattr(options, "alignCorners", False) or factor < 2 or out_h != h * factor or out_w != w * factor
                or not _same_quantization(source, target)):
            operators.append(op)
            continue
        copies = schema.OperatorT()
        copies.opcodeIndex = operator_code_index(model, schema.BuiltinOperator.CONCATENATION)
        copies.inputs = [int(op.inputs[0])] * factor * factor
        copies.outputs = [append_tensor(model, [n, h, w, c * factor * factor], source.type, (target.name or b"") + b"_copies",
                                        copy.deepcopy(source.quantization))]
        copies.builtinOptionsType = schema.BuiltinOptions.ConcatenationOptions
        copies.builtinOptions = schema.ConcatenationOptionsT()
        copies.builtinOptions.axis = 3
        spread = schema.OperatorT()
        spread.opcodeIndex = operator_code_index(model, schema.BuiltinOperator.DEPTH_TO_SPACE)
        if source.type == schema.TensorType.INT8:  # TFLite's DEPTH_TO_SPACE takes int8 from version 2
            model.operatorCodes[spread.opcodeIndex].version = max(model.operatorCodes[spread.opcodeIndex].version, 2)
        spread.inputs, spread.outputs = list(copies.outputs), [int(op.outputs[0])]
        spread.builtinOptionsType = schema.BuiltinOptions.DepthToSpaceOptions
        spread.builtinOptions = schema.DepthToSpaceOptionsT()
        spread.builtinOptions.blockSize = factor
        operators.extend([copies, spread])
        rewritten += 1
    subgraph.operators = operators
    return rewritten


_FUSABLE_ACTIVATIONS = {
    schema.BuiltinOperator.RELU: schema.ActivationFunctionType.RELU,
    schema.BuiltinOperator.RELU6: schema.ActivationFunctionType.RELU6,
    schema.BuiltinOperator.RELU_N1_TO_1: schema.ActivationFunctionType.RELU_N1_TO_1,
}


def fuse_activations_into_transpose_convs(model: schema.ModelT) -> int:
    """A TRANSPOSE_CONV followed by its own RELU / RELU6 / RELU_N1_TO_1 (possibly after a QUANTIZE onto
    the activation's grid), which litert-torch's int8 conversion leaves as separate ops (its fp32
    conversion fuses them), becomes one TRANSPOSE_CONV with that fused activation, writing the
    activation's output tensor. In an int8 file the activation often requantizes onto the grid of a
    concatenation that reads it, which XNNPACK's clamp does not take (it ran on TFLite's kernel and split
    the graph); fused, the convolution rounds once, onto that grid, as the fake-quant model does
    (``op_points.fold_into_concatenations``). Returns how many."""
    subgraph = model.subgraphs[0]
    readers = _readers(subgraph)
    outputs = {int(t) for t in subgraph.outputs}
    removed, fusions = set(), 0
    for op in subgraph.operators:
        if builtin_code(model, op) != schema.BuiltinOperator.TRANSPOSE_CONV:
            continue
        options = op.builtinOptions
        if options is None or options.fusedActivationFunction != schema.ActivationFunctionType.NONE:
            continue
        between, written = [], int(op.outputs[0])
        while True:
            users = readers.get(written, [])
            if len(users) != 1 or written in outputs:
                break
            reader = subgraph.operators[users[0]]
            if builtin_code(model, reader) != schema.BuiltinOperator.QUANTIZE or between or \
                    subgraph.tensors[written].type != subgraph.tensors[int(reader.outputs[0])].type:  # not a float island's border
                break
            between.append(users[0])  # a requantization onto the activation's grid: the conv writes that grid
            written = int(reader.outputs[0])
        if len(users) != 1 or written in outputs:
            continue
        activation = subgraph.operators[users[0]]
        fused = _FUSABLE_ACTIVATIONS.get(builtin_code(model, activation))
        if fused is None:
            continue
        options.fusedActivationFunction = fused
        op.outputs = [int(activation.outputs[0])]
        removed.update([*between, users[0]])
        fusions += 1
    subgraph.operators = [op for index, op in enumerate(subgraph.operators) if index not in removed]
    return fusions


def _reshaped(model: schema.ModelT, source: int, target: int) -> schema.OperatorT:
    """A RESHAPE of tensor ``source`` into tensor ``target`` (same values, the target's shape)."""
    shape = [int(d) for d in model.subgraphs[0].tensors[target].shape]
    reshape = schema.OperatorT()
    reshape.opcodeIndex = operator_code_index(model, schema.BuiltinOperator.RESHAPE)
    reshape.inputs = [source, append_tensor(model, [len(shape)], schema.TensorType.INT32, b"reshape_to",
                                            data=np.array(shape, dtype="<i4").tobytes())]
    reshape.outputs = [target]
    return reshape


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
    source, axes = int(op.inputs[0]), _constant(model, int(op.inputs[1]))
    if axes is None or len(subgraph.tensors[source].shape) != 4:
        return None
    producer = producers.get(source)
    if producer is not None and builtin_code(model, producer) == schema.BuiltinOperator.TRANSPOSE:
        perm = _constant(model, int(producer.inputs[1]))
        before = None if perm is None else _axes_before(perm, axes)
        if before is not None and before.tolist() == [1, 2]:
            source, axes = int(producer.inputs[0]), before
    if sorted(int(a) % 4 for a in axes) != [1, 2]:
        return None
    _, h, w, _ = (int(d) for d in subgraph.tensors[source].shape)
    return source, (h, w), (1, 1), schema.ActivationFunctionType.NONE


def averages_as_depthwise_convs(model: schema.ModelT) -> int:
    """Rewrite, in place, each int8 average over a window of at most 25 values that keeps its input's
    grid (``spec.average_as_depthwise``): a MEAN over a 4-D value's spatial axes (a global pooling, a
    squeeze-excite's squeeze), an AVERAGE_POOL_2D with VALID padding (DenseNet's transitions). Each
    becomes a DEPTHWISE_CONV_2D of int8 ones with the scale 1 / window and a zero bias, and a RESHAPE
    where the mean's output has another shape. XNNPACK (ai-edge-litert 2.3) runs the int8 MEAN as
    int32 sums requantized by a scalar loop (mobilenet_v3_small's ten MEANs, 6% of its int8 time), and
    leaves int8 AVERAGE_POOL_2D to TFLite's kernel, splitting the graph. The conv rounds the integers'
    mean half to even and adds the zero point (the MEAN adds it first): training rounds as the file
    does (``op_points._mean_on_input_grid``). Only the int8 file: XNNPACK's fp32 MEAN is as fast as
    the conv or faster. The file grows by the ones and the zero bias (window x channels + 4 x channels
    bytes: 8.6 KB for a 2x2 pool over 1024 channels). Returns how many."""
    subgraph = model.subgraphs[0]
    producers = _producers(subgraph)
    operators, bypassed, rewritten = [], set(), 0
    for op in subgraph.operators:
        window = _average_window(model, op, producers)
        source = None if window is None else subgraph.tensors[window[0]]
        target = subgraph.tensors[int(op.outputs[0])]
        if (window is None or source.type != schema.TensorType.INT8 or not _same_quantization(source, target)
                or not average_as_depthwise(window[1][0] * window[1][1])):
            operators.append(op)
            continue
        (kh, kw), count = window[1], window[1][0] * window[1][1]
        n, h, w, c = (int(d) for d in source.shape)
        input_scale = np.float32(source.quantization.scale[0])
        # One scale for every channel (per-channel tables would add 12 bytes a channel to the file).
        weights = schema.QuantizationParametersT()
        weights.scale = np.array([np.float32(1.0) / np.float32(count)], dtype=np.float32)
        weights.zeroPoint = np.zeros(1, dtype=np.int64)
        bias = schema.QuantizationParametersT()
        bias.scale = (input_scale * weights.scale).astype(np.float32)
        bias.zeroPoint = np.zeros(1, dtype=np.int64)
        name = target.name or b"average"
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
        shape = [n, (h - kh) // window[2][0] + 1, (w - kw) // window[2][1] + 1, c]
        if [int(d) for d in target.shape] == shape:
            conv.outputs = [int(op.outputs[0])]
            operators.append(conv)
        else:  # a mean that drops the reduced axes, or one read through a transpose to NCHW
            conv.outputs = [append_tensor(model, shape, target.type, name + b"_pooled", copy.deepcopy(target.quantization))]
            operators.extend([conv, _reshaped(model, conv.outputs[0], int(op.outputs[0]))])
        if int(op.inputs[0]) != window[0]:
            bypassed.add(int(op.inputs[0]))
        rewritten += 1
    # A transpose the mean read through, read by nothing else now, goes.
    read = {int(t) for op in operators for t in (op.inputs if op.inputs is not None else [])} | {int(t) for t in subgraph.outputs}
    subgraph.operators = [op for op in operators if not (int(op.outputs[0]) in bypassed and int(op.outputs[0]) not in read)]
    return rewritten


_WEIGHT_DTYPES = {schema.TensorType.INT8: np.int8, schema.TensorType.FLOAT32: np.float32,
                  schema.TensorType.FLOAT16: np.float16}


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
    readers = _readers(subgraph)
    cropped = 0
    for op in subgraph.operators:
        options = op.builtinOptions
        if (builtin_code(model, op) not in convolutions or options is None or options.padding != schema.Padding.SAME
                or (options.strideH, options.strideW, options.dilationHFactor, options.dilationWFactor) != (1, 1, 1, 1)):
            continue
        source, weight = subgraph.tensors[int(op.inputs[0])], subgraph.tensors[int(op.inputs[1])]
        buffer = model.buffers[weight.buffer]
        if (buffer.data is None or weight.sparsity is not None or weight.type not in _WEIGHT_DTYPES
                or len(source.shape) != 4 or len(readers.get(int(op.inputs[1]), [])) != 1):
            continue
        (_, kh, kw, _), (_, h, w, _) = ([int(d) for d in weight.shape], [int(d) for d in source.shape])
        used_h, used_w = min(kh, 2 * h - 1), min(kw, 2 * w - 1)
        if kh % 2 == 0 or kw % 2 == 0 or (used_h, used_w) == (kh, kw):
            continue
        top, left = (kh - used_h) // 2, (kw - used_w) // 2
        values = np.asarray(buffer.data, dtype=np.uint8).view(_WEIGHT_DTYPES[weight.type]).reshape([int(d) for d in weight.shape])
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
    paddings = _constant(model, int(op.inputs[1]))
    if (len(source.shape) != 4 or paddings is None or paddings.size != 8
            or subgraph.tensors[int(op.inputs[1])].type != schema.TensorType.INT32):
        return None
    paddings = paddings.reshape(4, 2)
    if paddings[0].any() or paddings[3].any():
        return None
    if len(op.inputs) < 3:
        return paddings
    data = model.buffers[subgraph.tensors[int(op.inputs[2])].buffer].data
    if data is None or source.type not in _WEIGHT_DTYPES:
        return None
    value = np.asarray(data, dtype=np.uint8).view(_WEIGHT_DTYPES[source.type]).reshape(-1)
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
    readers = _readers(subgraph)
    producers = _producers(subgraph)
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
        operators += [_reshaped(model, source_index, rows), op, _reshaped(model, padded_rows, target)]
        rewritten += 1
    subgraph.operators = operators
    return rewritten


def use_xnnpack_forms(model: schema.ModelT) -> int:
    """The changes above, in place; returns how many ops changed."""
    return (fold_transposes_into_means(model) + fuse_activations_into_transpose_convs(model)
            + nearest_upsampling_as_depth_to_space(model) + split_wide_concatenations(model)
            + averages_as_depthwise_convs(model) + crop_kernels_to_their_input(model) + pads_as_rows(model))
