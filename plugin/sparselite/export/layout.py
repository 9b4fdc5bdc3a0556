"""Graph forms XNNPACK runs faster, or at all: changes to a converted file that leave every value it
computes as it was. Applied to the int8 and the fp32 exports alike, so that their latency ratio
compares quantization only.

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
"""

from __future__ import annotations

import copy

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from sparselite.tflite.flatbuffer import append_tensor, builtin_code


def _constant(model: schema.ModelT, tensor: int) -> np.ndarray | None:
    data = model.buffers[model.subgraphs[0].tensors[tensor].buffer].data
    return None if data is None else np.asarray(data, dtype=np.uint8).view(np.int32)


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
    readers: dict[int, list[int]] = {}
    for index, op in enumerate(subgraph.operators):
        for tensor in op.inputs if op.inputs is not None else []:
            readers.setdefault(int(tensor), []).append(index)
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


def use_xnnpack_forms(model: schema.ModelT) -> int:
    """Both changes above, in place; returns how many ops changed."""
    return fold_transposes_into_means(model) + split_wide_concatenations(model)
