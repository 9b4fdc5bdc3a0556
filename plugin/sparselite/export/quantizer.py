"""litert's PT2E quantizer, completed so that every op TFLite runs in int8 is annotated int8.

litert's quantizer annotates conv/linear well, but its activation patterns are matched on module
*source partitions*: a ReLU module called twice (ResNet's BasicBlock), two adds in a row, SiLU,
hardsigmoid and sigmoid gates come out as float islands (DEQUANTIZE -> op -> QUANTIZE). This module
keeps litert's weight-carrying annotators (conv, linear) and annotates every other op by its *kind*,
in graph order, from one table:

- ``SHARES_INPUT_RANGE``: ops whose int8 output TFLite keeps in the input's scale (activations that
  fuse or clamp, pooling, every shape op). Their output shares the input's observer.
- ``OWN_RANGE``: ops that requantize (ADD, SUB, MUL, HARD_SWISH, GELU, BATCH_MATMUL, ...). Their
  inputs and output each get an observer; QAT learns the output range at the same point.
- ``FIXED_RANGE``: LOGISTIC, TANH, SOFTMAX, whose int8 kernels require a fixed output scale.
- ``CONCATENATION``: one range shared by all inputs and the output (TFLite's kernel requires it).

Ops with no int8 TFLite kernel are rewritten first where an exact int8 form exists (SiLU is x *
sigmoid(x), hardsigmoid is relu6(x + 3) / 6); anything else stays unannotated and becomes a float
island, which the exporter reports by name (and refuses unless float fallback is allowed).
"""

from __future__ import annotations

import math

import torch
from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
from torch.fx import Graph, GraphModule, Node
from torchao.quantization.pt2e.quantizer import (
    FixedQParamsQuantizationSpec, QuantizationAnnotation, SharedQuantizationSpec,
)

from sparselite.export.lowering import innermost_module, lower_for_litert, op_kind, rewrite_ops, window_pooling
from sparselite.quantization.spec import ACT_QMAX, ACT_QMIN, FIXED_OUTPUT_QPARAMS, SHARES_INPUT_RANGE, SPLITS

aten = torch.ops.aten

# Only ops with an int8 TFLite kernel: DIV, POW and SQRT have none (division by a constant is
# rewritten as a multiplication below).
OWN_RANGE = {
    "add", "sub", "mul", "hardswish", "gelu", "leaky_relu", "elu", "neg", "abs", "sum", "bmm", "matmul",
    "rsqrt", "minimum", "maximum", "prelu", "_prelu_kernel",
}
# TFLite's int8 LOGISTIC and SOFTMAX require output scale 1/256, zero point -128; TANH 1/128, 0
# (training simulates the same grids: quantization/int8_rounding.py).
FIXED_RANGE = {**FIXED_OUTPUT_QPARAMS, "_softmax": FIXED_OUTPUT_QPARAMS["softmax"]}
CONCATENATION = {"cat", "concat", "stack"}
TRANSPOSED_CONVOLUTIONS = {"conv_transpose1d", "conv_transpose2d"}

# litert's annotators that this quantizer keeps: the ones that carry weights and biases. Its
# activation patterns are replaced by the op table above (see the module docstring).
WEIGHT_ANNOTATORS = ["linear", "addmm", "conv_relu", "conv"]


def is_float_tensor(node: object) -> bool:
    value = node.meta.get("val") if isinstance(node, Node) else None
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _annotation(node: Node) -> QuantizationAnnotation | None:
    annotation = node.meta.get("quantization_annotation")
    return annotation if annotation is not None and annotation._annotated else None


def _has_output_range(node: Node) -> bool:
    annotation = _annotation(node)
    return annotation is not None and annotation.output_qspec is not None


def _tensor_inputs(node: Node) -> list[Node]:
    inputs = []
    for arg in node.args:
        for item in arg if isinstance(arg, (list, tuple)) else (arg,):
            if is_float_tensor(item) and item not in inputs:
                inputs.append(item)
    return inputs


def _silu(graph: Graph, node: Node) -> list[Node]:
    x = node.args[0]
    gate = graph.call_function(aten.sigmoid.default, (x,))
    return [gate, graph.call_function(aten.mul.Tensor, (x, gate))]


def _hardsigmoid(graph: Graph, node: Node) -> list[Node]:
    shifted = graph.call_function(aten.add.Tensor, (node.args[0], 3.0))
    clamped = graph.call_function(aten.hardtanh.default, (shifted, 0.0, 6.0))
    return [shifted, clamped, graph.call_function(aten.mul.Tensor, (clamped, 1.0 / 6.0))]


def _hardswish(graph: Graph, node: Node) -> list[Node]:
    """x * relu6(x + 3) / 6: XNNPACK (ai-edge-litert 2.3) delegates int8 ADD and MUL, not int8 HARD_SWISH,
    which then runs on TFLite's own kernel and splits the graph (docs/upstream/xnnpack_int8_hardswish.md)."""
    gate = _hardsigmoid(graph, node)
    return [*gate, graph.call_function(aten.mul.Tensor, (node.args[0], gate[-1]))]


def _divide_by_constant(graph: Graph, node: Node) -> list[Node] | None:
    """x / c as x * (1/c): TFLite has no int8 DIV."""
    divisor = node.args[1] if len(node.args) > 1 else None
    if not isinstance(divisor, (int, float)) or divisor == 0 or node.kwargs.get("rounding_mode"):
        return None
    return [graph.call_function(aten.mul.Tensor, (node.args[0], 1.0 / float(divisor)))]


def _prelu(graph: Graph, node: Node) -> list[Node] | None:
    """A PReLU with one slope is a leaky ReLU with that slope (LEAKY_RELU has an int8 kernel; litert
    lowers PReLU to float RELU, MUL and SUB ops). One slope per channel stays as it is."""
    weight = node.args[1]
    if not isinstance(weight, Node) or weight.op != "get_attr":
        return None
    owner, _, name = weight.target.rpartition(".")
    slope = getattr(graph.owning_module.get_submodule(owner), name, None)
    if not isinstance(slope, torch.Tensor) or slope.numel() != 1:
        return None
    return [graph.call_function(aten.leaky_relu.default, (node.args[0], float(slope)))]


def _layer_norm(graph: Graph, node: Node) -> list[Node]:
    """MEAN, SUB, MUL, MEAN, ADD, RSQRT, MUL (+ affine MUL, ADD): TFLite's own int8 form of LayerNorm."""
    x, shape = node.args[0], node.args[1]
    weight = node.args[2] if len(node.args) > 2 else None
    bias = node.args[3] if len(node.args) > 3 else None
    eps = node.args[4] if len(node.args) > 4 else 1e-5
    dims = list(range(-len(shape), 0))
    mean = graph.call_function(aten.mean.dim, (x, dims, True))
    centered = graph.call_function(aten.sub.Tensor, (x, mean))
    squared = graph.call_function(aten.mul.Tensor, (centered, centered))
    variance = graph.call_function(aten.mean.dim, (squared, dims, True))
    shifted = graph.call_function(aten.add.Tensor, (variance, float(eps)))
    inverse = graph.call_function(aten.rsqrt.default, (shifted,))
    nodes = [mean, centered, squared, variance, shifted, inverse, graph.call_function(aten.mul.Tensor, (centered, inverse))]
    if weight is not None:
        nodes.append(graph.call_function(aten.mul.Tensor, (nodes[-1], weight)))
    if bias is not None:
        nodes.append(graph.call_function(aten.add.Tensor, (nodes[-1], bias)))
    return nodes


def _attention(graph: Graph, node: Node) -> list[Node] | None:
    """softmax(q k^T * scale) v as BATCH_MATMUL, MUL, SOFTMAX, BATCH_MATMUL (no mask, dropout or causal)."""
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
    dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    if mask is not None or causal or dropout or node.kwargs.get("enable_gqa"):
        return None
    if scale is None:
        scale = 1.0 / math.sqrt(q.meta["val"].shape[-1])
    keys = graph.call_function(aten.transpose.int, (k, -2, -1))
    scores = graph.call_function(aten.matmul.default, (q, keys))
    scaled = graph.call_function(aten.mul.Tensor, (scores, float(scale)))
    weights = graph.call_function(aten._softmax.default, (scaled, -1, False))
    return [keys, scores, scaled, weights, graph.call_function(aten.matmul.default, (weights, v))]


def _adaptive_average(graph: Graph, node: Node) -> list[Node] | None:
    """Adaptive average pooling whose windows do not tile its input (VGG's 7x7 pool over a 2x2 map): each
    distinct window as a slice and a MEAN, concatenated. litert lowers it to GATHER_ND, SELECT and SUM
    ops that stay float. Every window is averaged once, on the input's grid, as training's fake-quant
    model averages it (``int8_rounding.mean_on_input_grid``); pools whose windows tile the input convert
    to AVERAGE_POOL_2D or MEAN as they are."""
    x, output_size = node.args[0], list(node.args[1])
    sizes = list(x.meta["val"].shape[-len(output_size):])
    if all(size % out == 0 for size, out in zip(sizes, output_size)):
        return None
    dims = list(range(x.meta["val"].dim() - len(output_size), x.meta["val"].dim()))
    return window_pooling(graph, x, output_size, lambda value: graph.call_function(aten.mean.dim, (value, dims, True)))


# Ops with no int8 TFLite kernel, and their exact forms that have one.
_DECOMPOSITIONS = {
    "silu": _silu, "hardsigmoid": _hardsigmoid, "hardswish": _hardswish,
    "layer_norm": _layer_norm, "scaled_dot_product_attention": _attention,
    "div": _divide_by_constant, "prelu": _prelu,
    "adaptive_avg_pool2d": _adaptive_average, "_adaptive_avg_pool2d": _adaptive_average,
    "adaptive_avg_pool1d": _adaptive_average,
}


def decompose_for_int8(model: GraphModule, float_modules: frozenset[str] = frozenset()) -> GraphModule:
    """Rewrite ops with no int8 TFLite kernel into exact forms that have one (before annotation);
    ops that stay float (``float_modules``) keep their one float TFLite op. Ops litert-torch cannot
    lower at all are rewritten in any case (``lowering.py``)."""
    _drop_concatenations_of_one(model.graph)
    lower_for_litert(model)
    rewrite_ops(model, _DECOMPOSITIONS, keep=lambda node: innermost_module(node) in float_modules)
    model.graph.eliminate_dead_code()
    model.graph.lint()
    model.recompile()
    return model


def _drop_concatenations_of_one(graph: Graph) -> None:
    """``torch.cat([x])`` is ``x``. Left in, litert-torch drops the CONCATENATION but keeps the int32 bias
    of the layer that reads it on the grid of the concatenation's own scale, while the layer reads x
    on x's: DenseNet's first dense layer came out up to 15 output LSBs off (docs/upstream/
    litert_single_input_concatenation.md). Training does not count it as a call site either."""
    for node in list(graph.nodes):
        if op_kind(node) in ("cat", "concat") and isinstance(node.args[0], (list, tuple)) and len(node.args[0]) == 1:
            node.replace_all_uses_with(node.args[0][0])
            graph.erase_node(node)


def _constants_at_operand_rank(model: GraphModule) -> GraphModule:
    """Give each 0-d constant operand of an elementwise op the rank of its other operand ([] -> [1, 1, 1, 1]).

    litert turns a scalar operand (``x + 3``, ``x * 0.5``, and the rewrites above) into a 0-d constant
    tensor so that it can be quantized. Its layout pass then sees an ADD/MUL with an input that is not
    4-D, keeps that op in NCHW, and wraps it in two TRANSPOSEs: 36 in MobileNetV3-Small's int8 file
    (0 in its float one, where the scalar stays a scalar). All-ones shapes broadcast exactly as a
    scalar does, so the values are unchanged."""
    for node in model.graph.nodes:
        if node.op != "call_function" or op_kind(node) not in ("add", "mul", "sub"):
            continue
        operands = [a for a in node.args if isinstance(a, Node)]
        ranks = [a.meta["val"].dim() for a in operands if isinstance(a.meta.get("val"), torch.Tensor)]
        for constant in operands:
            if constant.op != "get_attr" or not ranks:
                continue
            owner_path, _, name = constant.target.rpartition(".")
            owner = model.get_submodule(owner_path)
            value = getattr(owner, name)
            if isinstance(value, torch.Tensor) and value.dim() == 0 and len(constant.users) == 1:
                reshaped = value.reshape([1] * max(ranks))
                # A learned scalar (``x * self.scale + self.shift``) is a Parameter, which only a Parameter replaces.
                setattr(owner, name, torch.nn.Parameter(reshaped.detach(), requires_grad=False)
                        if isinstance(value, torch.nn.Parameter) else reshaped)
    model.recompile()
    return model


_FILLS = {"zeros_like", "ones_like", "full_like", "zeros", "ones", "full", "new_zeros", "new_ones", "new_full"}


def _fills_as_constants(model: GraphModule) -> GraphModule:
    """Each tensor made by a fill of a static shape (``torch.zeros_like(x[:, :4])``: the zero channels a
    residual concatenates to widen its skip path) as the constant it is: a fill has no int8 kernel, and its
    values depend on nothing the model computes."""
    for index, node in enumerate(list(model.graph.nodes)):
        value = node.meta.get("val")
        if op_kind(node) not in _FILLS or not isinstance(value, torch.Tensor) or not value.is_floating_point() \
                or any(not isinstance(d, int) for d in value.shape):
            continue
        constant = torch.full(tuple(value.shape), _fill_value(node), dtype=value.dtype)
        name = f"_sparselite_fill_{index}"
        model.register_buffer(name, constant)
        with model.graph.inserting_before(node):
            attribute = model.graph.get_attr(name)
        attribute.meta["val"] = value
        node.replace_all_uses_with(attribute)
        model.graph.erase_node(node)
    model.graph.lint()
    model.recompile()
    return model


def _fill_value(node: Node) -> float:
    kind = op_kind(node)
    if kind in ("zeros_like", "zeros", "new_zeros"):
        return 0.0
    if kind in ("ones_like", "ones", "new_ones"):
        return 1.0
    return float(node.args[-1] if kind != "full_like" else node.args[1])


class FullInt8Quantizer(PT2EQuantizer):
    """``PT2EQuantizer`` with litert's weight annotators and an op-kind table for everything else.

    ``float_modules``: paths of modules whose own ops stay float (not their submodules' ops): the
    export's float fallback for ops a runtime cannot run in int8 (``export_tflite(float_fallback="xnnpack")``).
    """

    STATIC_OPS = WEIGHT_ANNOTATORS
    STATIC_QAT_ONLY_OPS: list[str] = []

    def __init__(self, float_modules: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.float_modules = frozenset(float_modules)
        self.set_global(get_symmetric_quantization_config(is_per_channel=True))

    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        # Decompose first: litert's pass then turns the new scalar operands into constant tensors.
        decomposed = decompose_for_int8(_fills_as_constants(model), self.float_modules)
        return _constants_at_operand_rank(super().transform_for_annotation(decomposed))

    def annotate(self, model: GraphModule) -> GraphModule:
        super().annotate(model)
        float_nodes = set()
        for node in model.graph.nodes:  # before the op table runs, so nothing outside shares their ranges
            if innermost_module(node) in self.float_modules:
                node.meta.pop("quantization_annotation", None)
                float_nodes.add(node)
        _unshare_from(model, float_nodes, self.global_config.input_activation, self.global_config.output_activation)
        annotate_by_op_kind(model, self.global_config.input_activation, self.global_config.output_activation,
                            self.float_modules)
        return model


def _shares_with(qspec, nodes: set[Node]) -> bool:
    if not isinstance(qspec, SharedQuantizationSpec):
        return False
    shared = qspec.edge_or_node
    return any(n in nodes for n in shared) if isinstance(shared, tuple) else shared in nodes


def _unshare_from(model: GraphModule, float_nodes: set[Node], input_spec, output_spec) -> None:
    """litert's annotator shares a producer's range with the shape ops after it (a permute after a linear):
    where the producer stays float, a shape op that shared its range loses its annotation too, so that the op
    table keeps it float with its input; any other op observes the edge with a range of its own. (Left
    as they were, pt2e's prepare fails on the missing producer: ``KeyError: linear_1``.) In graph order, so a
    chain of shape ops follows its first."""
    unshared = set(float_nodes)
    for node in model.graph.nodes:
        annotation = _annotation(node)
        if annotation is None or node in unshared:
            continue
        if op_kind(node) in SHARES_INPUT_RANGE and _shares_with(annotation.output_qspec, unshared):
            del node.meta["quantization_annotation"]
            unshared.add(node)
            continue
        annotation.input_qspec_map = {source: input_spec if _shares_with(qspec, unshared) else qspec
                                      for source, qspec in annotation.input_qspec_map.items()}
        if _shares_with(annotation.output_qspec, unshared):
            annotation.output_qspec = output_spec


def annotate_by_op_kind(model: GraphModule, input_spec, output_spec, float_modules: frozenset[str] = frozenset()) -> None:
    """Annotate every not-yet-annotated op of a known kind, in graph order (inputs before users).

    The ops of ``float_modules`` stay float, and so do the shape ops and activations after them that
    keep their input's range (a dropout after a float GELU): quantizing there would put the border right
    after the float op, and the converter would fuse that op back into int8."""
    float_nodes: set[Node] = set()
    for node in model.graph.nodes:
        if node.op != "call_function" or _annotation(node) is not None:
            continue
        if innermost_module(node) in float_modules:
            float_nodes.add(node)
            continue
        kind = op_kind(node)
        inputs = _tensor_inputs(node)
        if not inputs:
            continue
        if kind in SHARES_INPUT_RANGE and inputs[0] in float_nodes:
            float_nodes.add(node)
        elif kind in SHARES_INPUT_RANGE and is_float_tensor(node):
            _annotate_shared(node, inputs[0], input_spec)
        elif kind in SHARES_INPUT_RANGE:  # values and indices (max pooling, a max over a dim): the values share it
            _annotate_split(node, inputs[0], input_spec)
        elif kind in OWN_RANGE and is_float_tensor(node):
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={i: _input_qspec(i, input_spec) for i in inputs}, output_qspec=output_spec, _annotated=True)
        elif kind in FIXED_RANGE and is_float_tensor(node):
            scale, zero_point = FIXED_RANGE[kind]
            fixed = FixedQParamsQuantizationSpec(dtype=torch.int8, scale=scale, zero_point=zero_point,
                                                 quant_min=ACT_QMIN, quant_max=ACT_QMAX, qscheme=torch.per_tensor_affine)
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={inputs[0]: _input_qspec(inputs[0], input_spec)}, output_qspec=fixed, _annotated=True)
        elif kind in CONCATENATION and is_float_tensor(node):
            # TFLite's int8 CONCATENATION needs one scale: inputs with their own are requantized to it.
            first = inputs[0]
            shared = SharedQuantizationSpec((first, node))
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={first: input_spec, **{i: shared for i in inputs[1:]}}, output_qspec=shared, _annotated=True)
        elif kind in SPLITS:
            _annotate_split(node, inputs[0], input_spec)
        elif kind in TRANSPOSED_CONVOLUTIONS and is_float_tensor(node):
            # litert's conv annotator skips them. Input and output only: given int8 on both sides, the
            # converter quantizes the weight per output channel (dim 1 of torch's [in, out, k...]) and the
            # bias on input scale x weight scale, as QAT simulates (``qat._QATConvTranspose``).
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={inputs[0]: _input_qspec(inputs[0], input_spec)}, output_qspec=output_spec, _annotated=True)


def _input_qspec(source: Node, input_spec):
    """Read an input in the scale its producer already has (a fixed LOGISTIC range, say), not a new one."""
    return SharedQuantizationSpec(source) if _has_output_range(source) else input_spec


def _annotate_shared(node: Node, source: Node, input_spec) -> None:
    """Output in the input's scale: share the producer's observer, or observe the input edge if it has none."""
    if _has_output_range(source):
        shared = SharedQuantizationSpec(source)
        input_qspec = shared
    else:
        input_qspec, shared = input_spec, SharedQuantizationSpec((source, node))
    node.meta["quantization_annotation"] = QuantizationAnnotation(
        input_qspec_map={source: input_qspec}, output_qspec=shared, _annotated=True)


def _annotate_split(node: Node, source: Node, input_spec) -> None:
    """A split's pieces (``getitem`` users) keep the input's scale."""
    if _has_output_range(source):
        input_qspec = shared = SharedQuantizationSpec(source)
    else:
        input_qspec, shared = input_spec, SharedQuantizationSpec((source, node))
    node.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map={source: input_qspec}, _annotated=True)
    for user in node.users:
        if op_kind(user) == "getitem" and is_float_tensor(user):
            user.meta["quantization_annotation"] = QuantizationAnnotation(output_qspec=shared, _annotated=True)
