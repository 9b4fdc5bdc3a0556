"""Rewrites of exported aten graphs: ops litert-torch cannot lower, as equivalent ops it can.

Both exports use them (the int8 one before annotation, the fp32 baseline before conversion), so a
model converts in fp32 exactly when it converts in int8. ``rewrite_ops`` is the one place where a
node is replaced by a sequence of new ones; ``quantizer.decompose_for_int8`` uses it too.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping

import torch
from torch.fx import Graph, GraphModule, Node

aten = torch.ops.aten

Rewrite = Callable[[Graph, Node], "list[Node] | None"]


def innermost_module(node: Node) -> str | None:
    """The path of the module whose own ``forward`` called the op (``encoder.layers.0.ln_1``)."""
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else None


def op_kind(node: Node) -> str:
    """The aten op's base name ('add' for aten.add.Tensor and for in-place aten.add_.Tensor), '' for
    anything that is not an op call. In-place ops name their out-of-place kind: an int8 file has no
    in-place ops, and a model's ``nn.Dropout(inplace=True)`` or ``x += y`` must quantize like the rest."""
    if node.op != "call_function":
        return ""
    if node.target is operator.getitem:
        return "getitem"
    packet = getattr(node.target, "_overloadpacket", None)
    name = getattr(packet, "__name__", getattr(node.target, "__name__", "")).split(".")[-1]
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def rewrite_ops(model: GraphModule, rewrites: Mapping[str, Rewrite], keep: Callable[[Node], bool] = lambda node: False) -> int:
    """Replace each op whose aten base name is in ``rewrites`` (and that ``keep`` does not keep) by the
    nodes its rewrite returns, the last one standing for its value; a rewrite returning None leaves
    the op as it is. Returns how many ops were replaced."""
    graph = model.graph
    replaced = 0
    for node in list(graph.nodes):
        rewrite = rewrites.get(op_kind(node))
        if rewrite is None or keep(node):
            continue
        with graph.inserting_before(node):
            new_nodes = rewrite(graph, node)
        if not new_nodes:
            continue
        value = node.meta.get("val")
        for new in new_nodes:
            # The module stack names the op in reports; the fake value carries the dtype (of the values,
            # for an op that also returns indices).
            new.meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta})
            new.meta["val"] = value[0] if isinstance(value, (tuple, list)) else value
            new.meta["sparselite_decomposed"] = op_kind(node)  # not a call site of the user's code (see ranges.op_sites)
        node.replace_all_uses_with(new_nodes[-1])
        graph.erase_node(node)
        replaced += 1
    if replaced:
        graph.eliminate_dead_code()
        graph.lint()
        model.recompile()
    return replaced


def _pooling_windows(size: int, out: int) -> list[tuple[int, int]]:
    """Adaptive pooling's windows along one axis: [floor(i * size / out), ceil((i + 1) * size / out))."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def window_pooling(graph: Graph, x: Node, output_size: list[int], reduce: Callable[[Node], Node]) -> list[Node]:
    """Adaptive pooling of ``x`` as slices, one ``reduce`` per distinct window, and concatenations."""
    sizes = list(x.meta["val"].shape[-len(output_size):])
    dims = list(range(x.meta["val"].dim() - len(output_size), x.meta["val"].dim()))
    nodes: list[Node] = []
    windows: dict[tuple, Node] = {}

    def window(bounds: tuple[tuple[int, int], ...]) -> Node:
        if bounds not in windows:
            value = x
            for dim, (start, end) in zip(dims, bounds):
                value = graph.call_function(aten.slice.Tensor, (value, dim, start, end))
                nodes.append(value)
            if any(end - start > 1 for start, end in bounds):
                value = reduce(value)
                nodes.append(value)
            windows[bounds] = value
        return windows[bounds]

    def pooled(axis: int, prefix: tuple) -> Node:
        """The pooled values for every window along ``dims[axis:]``, given the windows before it."""
        if axis == len(dims):
            return window(prefix)
        parts = [pooled(axis + 1, (*prefix, bounds)) for bounds in _pooling_windows(sizes[axis], output_size[axis])]
        nodes.append(graph.call_function(aten.cat.default, (parts, dims[axis])))
        return nodes[-1]

    pooled(0, ())
    return nodes


def _adaptive_max(graph: Graph, node: Node) -> list[Node] | None:
    """Adaptive max pooling, which litert-torch cannot lower at all ("Lowering not found:
    aten.adaptive_max_pool2d", docs/upstream/litert_adaptive_max_pool.md): a max over the pooled axes
    for a global pool, otherwise each distinct window as a slice and a max (REDUCE_MAX), as adaptive
    average pooling does in int8. A max keeps its input's grid, so training needs nothing. Not when
    the indices are read."""
    values = [user for user in node.users if op_kind(user) == "getitem" and user.args[1] == 0]
    if any(user not in values and user.users for user in node.users):
        return None
    x, output_size = node.args[0], list(node.args[1])
    dims = list(range(x.meta["val"].dim() - len(output_size), x.meta["val"].dim()))

    def maximum(value: Node) -> Node:
        return graph.call_function(aten.amax.default, (value, dims, True))

    nodes = [maximum(x)] if all(out == 1 for out in output_size) else window_pooling(graph, x, output_size, maximum)
    for user in list(node.users):  # the values' getitem (and an unread indices' one) go with the op
        user.replace_all_uses_with(nodes[-1])
        graph.erase_node(user)
    return nodes


# Ops litert-torch has no lowering for, and equivalent forms it has.
LOWERINGS: dict[str, Rewrite] = {"adaptive_max_pool2d": _adaptive_max, "adaptive_max_pool1d": _adaptive_max}


# Elementwise ops that broadcast their operands, as TFLite's do.
BROADCASTING_OPS = frozenset({"add", "sub", "mul", "div", "maximum", "minimum"})


def drop_broadcast_expands(model: GraphModule) -> int:
    """``x * c.expand_as(x)`` is ``x * c``: drop each ``expand`` read only by broadcasting elementwise ops whose
    other operand already has the expanded shape. litert-torch's layout pass mishandles that expand when
    the product feeds a conv (``'tfl.mul' op operands don't have broadcast-compatible shapes``: MobileViTv2's
    linear attention; docs/upstream/litert_expand_before_broadcast.md). The same values. Returns how many."""
    dropped = 0
    for node in list(model.graph.nodes):
        if op_kind(node) not in ("expand", "expand_as") or not node.users or "val" not in node.meta:
            continue
        shape = tuple(node.meta["val"].shape)

        def broadcasts_anyway(user: Node) -> bool:
            others = [a for a in user.args[:2] if a is not node]
            return (op_kind(user) in BROADCASTING_OPS and len(user.args) >= 2 and len(others) == 1
                    and isinstance(others[0], Node) and "val" in others[0].meta
                    and tuple(others[0].meta["val"].shape) == shape)

        if all(broadcasts_anyway(user) for user in node.users):
            node.replace_all_uses_with(node.args[0])
            model.graph.erase_node(node)
            dropped += 1
    if dropped:
        model.graph.lint()
        model.recompile()
    return dropped


def needs_lowering(model: GraphModule) -> bool:
    return any(op_kind(node) in LOWERINGS for node in model.graph.nodes)


def lower_for_litert(model: GraphModule) -> int:
    """Rewrite, in place, the ops litert-torch cannot lower or mishandles; returns how many."""
    return rewrite_ops(model, LOWERINGS) + drop_broadcast_expands(model)
