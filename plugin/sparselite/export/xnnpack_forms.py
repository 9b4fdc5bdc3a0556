"""Graph forms XNNPACK runs faster, or at all: changes to a converted file that leave every value it
computes as it was (but one, whose rounding training follows). They are applied to the int8 and the fp32
exports alike, so that their latency ratio compares quantization only; the one that touches int8 ops
only is there because XNNPACK's fp32 op is already as fast.

- ``fold_transposes_into_means``: litert-torch runs the graph in NHWC, but a mean that torch code
  writes over NCHW's spatial axes (``x.mean((2, 3))``, ShuffleNet's head) comes out as TRANSPOSE to
  NCHW, then MEAN over axes 2 and 3. The mean of the untransposed value over the same axes (1 and 2
  in NHWC) computes the same numbers in the same output layout, without the transpose. The int8
  outputs are identical: the mean keeps its input's scale, and the transpose changes none of its integers.
- ``split_wide_concatenations``: XNNPACK delegates a CONCATENATION of at most 5 inputs; a wider one
  (DenseNet's, of every earlier layer's output; a decomposed adaptive pooling's) runs on TFLite's own
  kernel and splits the graph. It becomes a tree of concatenations of at most 5. Every input of an
  int8 concatenation is on its output's scale (TFLite requires it), so the groups take that scale and
  copy integers unchanged.
- ``nearest_upsampling_as_depth_to_space``: RESIZE_NEAREST_NEIGHBOR, which XNNPACK delegates in
  neither precision, as copies and DEPTH_TO_SPACE.
- ``fuse_activations_into_transpose_convs``: the RELU that litert-torch's int8 conversion leaves after
  a TRANSPOSE_CONV, as its fused activation.
- ``pads_in_the_graphs_layout``: an int8 PAD (TensorFlow-"same" padding computed from the input size,
  timm's ``Conv2dSame``) that litert-torch's int8 conversion leaves in torch's NCHW, between a TRANSPOSE
  to NCHW and one back (its fp32 conversion pads in NHWC): the PAD of the untransposed value, with its
  paddings permuted. The same integers, without two transposes.
- the pooling and padding forms of ``xnnpack_pool_forms``.
- ``large_depthwise_kernels_on_tflite``: XNNPACK (ai-edge-litert 2.3, x86) runs a DEPTHWISE_CONV_2D of more
  than 25 taps (7x7, 9x9, 3x9: MixNet's mixed kernels, ConvNeXt's 7x7) 2-3x slower than TFLite's own kernel
  in fp32 and 10-13x slower in int8; up to 25 taps it is 3-5x faster (docs/upstream/xnnpack_large_depthwise.md).
  Such a conv reads its weights through a RESHAPE to the same shape: XNNPACK takes only constant weights,
  so the conv runs on TFLite's kernel and the ops around it stay delegated. The same values, up to the
  kernels' rounding of a half (at most 1 LSB in int8). Not for files meant for the GPU accelerator, which
  takes constant weights only too (``keep_weights_constant``).

- ``patch_convs_as_space_to_depth``: a conv whose square kernel is its stride (a ViT's patch embedding) as
  SPACE_TO_DEPTH and a 1x1 conv: XNNPACK's indirect GEMM reads a few input channels per tap, its fully
  connected GEMM a whole patch per row. The same sums in fp32 and int8; a dynamic-range conv quantizes its
  input per patch rather than per image (``quantization/dynamic_range``).

``benchmarks/layout_forms.py`` times each with and without.
"""

from __future__ import annotations

import copy

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from sparselite.export.graph_edit import axes_before, constant_ints, producers_of, readers_of, same_quantization
from sparselite.export.xnnpack_pool_forms import averages_as_depthwise_convs, crop_kernels_to_their_input, pads_as_rows
from sparselite.quantization.spec import XNNPACK_MAX_FAST_DEPTHWISE_TAPS, non_overlapping_patches
from sparselite.tflite.flatbuffer import append_tensor, builtin_code, operator_code_index


def fold_transposes_into_means(model: schema.ModelT) -> int:
    """Make every MEAN that reads a TRANSPOSE read the transpose's input instead (with its axes
    permuted), in place, where the transpose has no other reader and the mean keeps no reduced
    dimension; the transposes go. Returns how many."""
    subgraph = model.subgraphs[0]
    readers = readers_of(subgraph)
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
        perm, axes = constant_ints(model, int(op.inputs[1])), constant_ints(model, int(mean.inputs[1]))
        if perm is None or axes is None or int(mean.inputs[0]) != int(op.outputs[0]):
            continue
        before = axes_before(perm, axes)
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
                or not same_quantization(source, target)):
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
    (``functional_ops.fold_into_concatenations``). Returns how many."""
    subgraph = model.subgraphs[0]
    readers = readers_of(subgraph)
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


_PADS = (schema.BuiltinOperator.PAD, schema.BuiltinOperator.PADV2)


def pads_in_the_graphs_layout(model: schema.ModelT) -> int:
    """Every TRANSPOSE -> PAD -> TRANSPOSE back (each the sole reader of the one before) becomes a PAD of
    the first transpose's input, with its paddings permuted, writing the second transpose's output; in
    place. Returns how many."""
    subgraph = model.subgraphs[0]
    readers, producers = readers_of(subgraph), producers_of(subgraph)
    outputs = {int(t) for t in subgraph.outputs}
    removed: set[int] = set()
    index_of = {id(op): index for index, op in enumerate(subgraph.operators)}
    for pad in subgraph.operators:
        if builtin_code(model, pad) not in _PADS:
            continue
        before, after_users = producers.get(int(pad.inputs[0])), readers.get(int(pad.outputs[0]), [])
        if before is None or builtin_code(model, before) != schema.BuiltinOperator.TRANSPOSE or len(after_users) != 1:
            continue
        after = subgraph.operators[after_users[0]]
        if removed & {index_of[id(before)], after_users[0]}:  # a transpose an earlier pad took
            continue
        if builtin_code(model, after) != schema.BuiltinOperator.TRANSPOSE or int(pad.outputs[0]) in outputs \
                or int(before.outputs[0]) in outputs or readers.get(int(before.outputs[0]), []) != [index_of[id(pad)]]:
            continue
        perm, back, pads = (constant_ints(model, int(t)) for t in (before.inputs[1], after.inputs[1], pad.inputs[1]))
        if perm is None or back is None or pads is None or [int(perm[int(b)]) for b in back] != list(range(len(perm))):
            continue
        if not same_quantization(subgraph.tensors[int(pad.outputs[0])], subgraph.tensors[int(after.outputs[0])]):
            continue
        widths = pads.reshape(len(perm), 2)
        untransposed = np.zeros_like(widths)
        untransposed[[int(p) for p in perm]] = widths  # output axis i of the transpose is its input axis perm[i]
        pad.inputs = [int(before.inputs[0]), append_tensor(model, [len(perm), 2], schema.TensorType.INT32,
                                                           b"pads_before_transpose", data=untransposed.astype("<i4").tobytes()),
                      *[int(t) for t in pad.inputs[2:]]]
        pad.outputs = [int(after.outputs[0])]
        removed.update([index_of[id(before)], after_users[0]])
    subgraph.operators = [op for index, op in enumerate(subgraph.operators) if index not in removed]
    return len(removed) // 2


def large_depthwise_kernels_on_tflite(model: schema.ModelT) -> int:
    """Give every DEPTHWISE_CONV_2D of one output channel per input channel with constant weights of more than
    25 taps (kernel height x width) its weights through a RESHAPE to their own shape, in place: XNNPACK then
    leaves the conv to TFLite's kernel. (A conv of one input channel, which the converter also writes as a
    depthwise conv, stays: its slowness was not measured.) Returns how many."""
    subgraph = model.subgraphs[0]
    changed = []
    for index, op in enumerate(subgraph.operators):
        if builtin_code(model, op) != schema.BuiltinOperator.DEPTHWISE_CONV_2D or len(op.inputs) < 2:
            continue
        source, weights = subgraph.tensors[int(op.inputs[0])], subgraph.tensors[int(op.inputs[1])]
        if model.buffers[weights.buffer].data is None or len(weights.shape) != 4 or len(source.shape) != 4:
            continue  # not stored in the conv's own constant (an fp16 weight behind its DEQUANTIZE): left as it is
        if int(weights.shape[3]) != int(source.shape[3]):
            continue
        if int(weights.shape[1]) * int(weights.shape[2]) <= XNNPACK_MAX_FAST_DEPTHWISE_TAPS:
            continue
        shape = append_tensor(model, [4], schema.TensorType.INT32, b"depthwise_weight_shape",
                              data=np.asarray(weights.shape, dtype="<i4").tobytes())
        read = append_tensor(model, list(weights.shape), weights.type, weights.name + b";run_time",
                             copy.deepcopy(weights.quantization))
        reshape = schema.OperatorT()
        reshape.opcodeIndex = operator_code_index(model, schema.BuiltinOperator.RESHAPE)
        reshape.inputs, reshape.outputs = [int(op.inputs[1]), shape], [read]
        op.inputs = [int(t) if slot != 1 else read for slot, t in enumerate(op.inputs)]
        changed.append((index, reshape))
    for index, reshape in reversed(changed):
        subgraph.operators.insert(index, reshape)
    return len(changed)


def left_to_tflite_on_purpose(model: schema.ModelT) -> set[int]:
    """The ops ``large_depthwise_kernels_on_tflite`` leaves to TFLite's kernels: each depthwise conv whose weights
    come through a RESHAPE of a constant, and that RESHAPE (op indices of the first subgraph)."""
    subgraph = model.subgraphs[0]
    producers = {int(t): index for index, op in enumerate(subgraph.operators) for t in op.outputs}
    found = set()
    for index, op in enumerate(subgraph.operators):
        if builtin_code(model, op) != schema.BuiltinOperator.DEPTHWISE_CONV_2D or len(op.inputs) < 2:
            continue
        reshape = producers.get(int(op.inputs[1]))
        if reshape is None or builtin_code(model, subgraph.operators[reshape]) != schema.BuiltinOperator.RESHAPE:
            continue
        stored = subgraph.tensors[int(subgraph.operators[reshape].inputs[0])]
        if model.buffers[stored.buffer].data is not None:
            found |= {index, reshape}
    return found


def large_depthwise_convs_on_tflite(model: schema.ModelT) -> list[str]:
    """The names of the stored weights of the depthwise convs ``large_depthwise_kernels_on_tflite`` left to
    TFLite's kernel (the module names, once ``names.use_module_names`` has run), in op order."""
    subgraph = model.subgraphs[0]
    names = []
    for index in sorted(left_to_tflite_on_purpose(model)):
        op = subgraph.operators[index]
        if builtin_code(model, op) == schema.BuiltinOperator.RESHAPE:
            names.append(subgraph.tensors[int(op.inputs[0])].name.decode(errors="replace").split(";")[0])
    return names


def patch_convs_as_space_to_depth(model: schema.ModelT) -> int:
    """Write each CONV_2D whose square kernel is its stride (a ViT's patch embedding, ConvNeXt's stem: windows
    that neither overlap nor leave a gap) over an input its stride divides, without padding, as
    SPACE_TO_DEPTH then a 1x1 conv, in place. XNNPACK runs the strided conv as an indirect GEMM that reads
    the few input channels of one tap at a time: a 3-channel 8x8 patch embedding took over 4x the time per
    multiply-add of the model's linears in a dynamic-range ViT. SPACE_TO_DEPTH lays each window's
    values out as one pixel's channels, in the order (row, column, channel) in which the conv's OHWI
    weight already stores them: the weight keeps its bytes, with the shape [O, 1, 1, k x k x C]. The same
    sums in the same order per tap. Returns how many."""
    subgraph = model.subgraphs[0]
    readers = readers_of(subgraph)
    changed = []
    for index, op in enumerate(subgraph.operators):
        options = op.builtinOptions
        if builtin_code(model, op) != schema.BuiltinOperator.CONV_2D or options is None or len(op.inputs) < 2:
            continue
        source, weight = subgraph.tensors[int(op.inputs[0])], subgraph.tensors[int(op.inputs[1])]
        if model.buffers[weight.buffer].data is None or weight.sparsity is not None or len(readers.get(int(op.inputs[1]), [])) != 1:
            continue
        if len(weight.shape) != 4 or len(source.shape) != 4:
            continue
        (_, kh, kw, channels), (batch, h, w, source_channels) = [int(d) for d in weight.shape], [int(d) for d in source.shape]
        if not (non_overlapping_patches((kh, kw), (options.strideH, options.strideW), (h, w)) and channels == source_channels
                and options.padding == schema.Padding.VALID and (options.dilationHFactor, options.dilationWFactor) == (1, 1)):
            continue
        blocks = append_tensor(model, [batch, h // kh, w // kw, kh * kw * channels], source.type,
                               source.name + b";space_to_depth", copy.deepcopy(source.quantization))
        space_to_depth = schema.OperatorT()
        space_to_depth.opcodeIndex = operator_code_index(model, schema.BuiltinOperator.SPACE_TO_DEPTH)
        space_to_depth.builtinOptionsType = schema.BuiltinOptions.SpaceToDepthOptions
        space_to_depth.builtinOptions = schema.SpaceToDepthOptionsT()
        space_to_depth.builtinOptions.blockSize = kh
        space_to_depth.inputs, space_to_depth.outputs = [int(op.inputs[0])], [blocks]
        op.inputs = [blocks] + [int(t) for t in op.inputs[1:]]
        options.strideH = options.strideW = 1
        weight.shape = np.array([weight.shape[0], 1, 1, kh * kw * channels], dtype=np.int32)
        changed.append((index, space_to_depth))
    for index, space_to_depth in reversed(changed):
        subgraph.operators.insert(index, space_to_depth)
    return len(changed)


def use_xnnpack_forms(model: schema.ModelT, keep_weights_constant: bool = False) -> int:
    """Every form above, in place; returns how many ops changed. ``keep_weights_constant``: for the GPU
    accelerator, which takes only constant weights, leave out ``large_depthwise_kernels_on_tflite``."""
    return (fold_transposes_into_means(model) + pads_in_the_graphs_layout(model) + fuse_activations_into_transpose_convs(model)
            + nearest_upsampling_as_depth_to_space(model) + split_wide_concatenations(model)
            + averages_as_depthwise_convs(model) + crop_kernels_to_their_input(model) + pads_as_rows(model)
            + patch_convs_as_space_to_depth(model)
            + (0 if keep_weights_constant else large_depthwise_kernels_on_tflite(model)))
