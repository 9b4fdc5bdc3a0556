"""Float islands: the ops a mixed-precision export keeps in float, where they come from, what they cost.

An int8 file's float island is DEQUANTIZE -> float op(s) -> QUANTIZE. ``float_islands`` lists them by
TFLite op type with the torch modules they come from (read from the tensor names after
``names.use_module_names``), ``time_islands`` adds each type's share of the XNNPACK latency, and
``modules_xnnpack_runs_slower_in_int8`` finds the modules ``float_fallback="xnnpack"`` keeps float.
"""

from __future__ import annotations

import copy

from ai_edge_litert.schema_py_generated import TensorType
from torch import nn

from sparselite.export.names import use_module_names
from sparselite.export.report import ExportReport, FloatIsland, shortened
from sparselite.runtime.litert import xnnpack_delegated_ops
from sparselite.tflite import flatbuffer

_FLOAT_TYPES = (TensorType.FLOAT32, TensorType.FLOAT16)

# Ops allowed to carry float tensors in an int8 model: the I/O conversions we add ourselves.
_IO_OPS = {"QUANTIZE", "DEQUANTIZE"}
ISLAND_CONVERSIONS = "conversions"  # island_ops' key for the QUANTIZE / DEQUANTIZE at island borders


def island_ops(model_t) -> dict[str, list[int]]:
    """Indices of the ops that kept float activations, by TFLite op type; ``ISLAND_CONVERSIONS`` holds
    the QUANTIZE / DEQUANTIZE ops at their borders (not the model's own input and output conversions,
    nor an int8 -> int8 QUANTIZE, which requantizes)."""
    subgraph = model_t.subgraphs[0]
    io = set(subgraph.inputs) | set(subgraph.outputs)
    found: dict[str, list[int]] = {}
    for index, op in enumerate(subgraph.operators):
        name = flatbuffer.builtin_name(flatbuffer.builtin_code(model_t, op))
        tensors = [subgraph.tensors[i] for i in list(op.inputs) + list(op.outputs) if i >= 0]
        if not any(t.type in _FLOAT_TYPES and model_t.buffers[t.buffer].data is None for t in tensors):
            continue  # no float activation
        if name not in _IO_OPS:
            found.setdefault(name, []).append(index)
        elif not io & (set(op.inputs) | set(op.outputs)):
            found.setdefault(ISLAND_CONVERSIONS, []).append(index)
    return found


def float_islands(model_t) -> list[FloatIsland]:
    """Ops that kept float activations, grouped by op type, with the torch modules they came from.

    Reads the tensor names after ``use_module_names`` has folded them back to module paths.
    """
    subgraph = model_t.subgraphs[0]
    islands = []
    for name, indices in sorted(island_ops(model_t).items()):
        if name == ISLAND_CONVERSIONS:
            continue
        outputs = [subgraph.operators[i].outputs for i in indices]
        modules = {module_of(subgraph.tensors[out[0]].name.decode(errors="replace")) if len(out) else "?" for out in outputs}
        islands.append(FloatIsland(name, len(indices), sorted(modules)))
    return islands


def time_islands(report: ExportReport, dense: bytes) -> None:
    """Each island op type's share of the file's XNNPACK latency, timed alone (runtime/op_cost.py)."""
    from sparselite.runtime.op_cost import latency_shares

    model_t = flatbuffer.read_model(dense)
    ops = island_ops(model_t)
    try:
        shares = latency_shares(model_t, dense, ops | {"all": [i for indices in ops.values() for i in indices]})
    except (ValueError, RuntimeError) as err:  # a cut-out LiteRT cannot run: the file itself is fine
        report.notes.append(f"float islands could not be timed alone: {str(err).splitlines()[0]}")
        return
    for island in report.float_islands:
        island.latency_share = shares.get(island.op)
    report.float_islands_latency_share = shares.get("all")


def module_of(tensor_name: str) -> str:
    """'blocks.0.mlp.act;2' -> 'blocks.0.mlp.act'; the converter's own names stay as they are."""
    return tensor_name.split(";")[0] or tensor_name or "?"


def islands_error(islands: list[FloatIsland]) -> str:
    shown = [f"{island.op} x{island.count} ({shortened(island.modules)})" for island in islands]
    return (f"{sum(i.count for i in islands)} op(s) have no int8 TFLite kernel: {'; '.join(shown)}. Pass "
            "float_fallback=True (CLI: --allow-float-ops) to keep them in float in a mixed-precision file, "
            "or replace those modules")


def modules_xnnpack_runs_slower_in_int8(model_t, float_model: nn.Module) -> dict[str, set[str]]:
    """The modules whose int8 ops XNNPACK does not delegate, with those ops' types, read from the
    loaded file. Each such op runs on TFLite's own kernel and splits the delegate's graph (int8 RSQRT,
    SOFTMAX, GELU and BATCH_MATMUL in XNNPACK 2.3); in float, XNNPACK runs those, so
    ``float_fallback="xnnpack"`` keeps those modules' ops float."""
    named = copy.deepcopy(model_t)
    use_module_names(named)
    delegated, _ = xnnpack_delegated_ops(flatbuffer.write_model(named))
    if delegated is None:  # XNNPACK cannot load the file at all: verification says so
        return {}
    modules = dict(float_model.named_modules())
    graph = named.subgraphs[0]
    already_float = {i for indices in island_ops(named).values() for i in indices}
    slow: dict[str, set[str]] = {}
    for index, op in enumerate(graph.operators):
        name = flatbuffer.builtin_name(flatbuffer.builtin_code(named, op))
        if index in delegated or index in already_float or name in _IO_OPS:
            continue
        for output in op.outputs:
            module = module_of(graph.tensors[output].name.decode(errors="replace"))
            if module in modules:
                slow.setdefault(module, set()).add(name)
    return slow


def xnnpack_fallback_notes(kept_float: frozenset[str], still_int8: dict[str, set[str]]) -> list[str]:
    """What ``float_fallback="xnnpack"`` did, for the report: the modules it kept float, and the int8
    ops XNNPACK still leaves to TFLite's kernels (a lone op the converter fused back into int8, or one
    XNNPACK takes in neither form)."""
    notes = []
    if kept := sorted(kept_float - set(still_int8)):
        notes.append(f"float_fallback='xnnpack': kept float the ops of {len(kept)} module(s) whose int8 ops XNNPACK "
                     f"leaves to TFLite's kernels: {', '.join(kept)}")
    if still_int8:
        left = sorted({f"{op} ({module})" for module, ops in still_int8.items() for op in ops})
        notes.append(f"XNNPACK still leaves these int8 ops to TFLite's kernels: {', '.join(left)}")
    return notes
