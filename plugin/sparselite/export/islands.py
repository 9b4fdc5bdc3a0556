"""Float islands: the ops a mixed-precision export keeps in float, where they come from, what they cost.

An int8 file's float island is DEQUANTIZE -> float op(s) -> QUANTIZE. ``float_islands`` lists them by
TFLite op type with the torch modules they come from (read from the tensor names after
``names.use_module_names``), ``time_islands`` adds each type's share of the XNNPACK latency, and
``keep_float_where_xnnpack_lacks_int8`` is ``float_fallback="xnnpack"``: which modules stay float.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

from ai_edge_litert.schema_py_generated import TensorType
from torch import nn

from sparselite.export.xnnpack_forms import left_to_tflite_on_purpose, use_xnnpack_forms
from sparselite.export.names import use_module_names
from sparselite.export.report import ExportReport, FloatIsland, shortened
from sparselite.runtime.litert import xnnpack_delegated_ops
from sparselite.runtime.op_cost import latency_shares, median_latencies
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


def float_ops_error(float_sources: dict[str, tuple[str, str]]) -> str:
    """The strict export's refusal, before any calibration or conversion, of torch ops the quantizer
    leaves float (``RangeInjection.float_sources``: op kind and module per range they leave unlearned)."""
    modules: dict[str, set[str]] = {}
    for kind, module in float_sources.values():
        modules.setdefault(kind, set()).add(module or "the top-level forward")
    shown = [f"{kind} ({shortened(sorted(names))})" for kind, names in sorted(modules.items())]
    return (f"{len(modules)} op type(s) have no int8 form: {'; '.join(shown)}. Pass float_fallback=True (CLI: "
            "--float-fallback) to keep them in float in a mixed-precision file (with calibration_data=[...] for the "
            "ranges around them), or replace those modules")


def islands_error(islands: list[FloatIsland]) -> str:
    shown = [f"{island.op} x{island.count} ({shortened(island.modules)})" for island in islands]
    return (f"{sum(i.count for i in islands)} op(s) have no int8 TFLite kernel: {'; '.join(shown)}. Pass "
            "float_fallback=True (CLI: --float-fallback) to keep them in float in a mixed-precision file, "
            "or replace those modules")


@dataclass(frozen=True)
class LeftOut:
    """An int8 op that XNNPACK leaves to TFLite's own kernels: it runs there and splits the delegate's graph."""

    op: str  # TFLite op type
    module: str  # the module whose own forward called it
    consumers: frozenset[str]  # the modules of the ops that read its output


def int8_ops_xnnpack_leaves_out(model_t, float_model: nn.Module, keep_weights_constant: bool = False) -> list[LeftOut]:
    """Read from the file loaded in XNNPACK (int8 RSQRT, SOFTMAX, GELU and BATCH_MATMUL in XNNPACK 2.3);
    float islands and the model's own (de)quantization are not counted. The file as export writes it:
    with the forms XNNPACK takes (``layout.use_xnnpack_forms``: a 7-input concatenation is left out
    before it is split, not after; ``keep_weights_constant`` as for a ``require_gpu`` export)."""
    named = as_written(model_t, keep_weights_constant)
    use_module_names(named)
    delegated, _ = xnnpack_delegated_ops(flatbuffer.write_model(named))
    if delegated is None:  # XNNPACK cannot load the file at all: verification says so
        return []
    modules = dict(float_model.named_modules())
    graph = named.subgraphs[0]
    root_type = f"{type(float_model).__module__}.{type(float_model).__qualname__}"  # the converter's name for the root's own ops

    def module(tensor: int) -> str | None:
        name = module_of(graph.tensors[tensor].name.decode(errors="replace"))
        return name if name in modules else "" if name == root_type else None

    already_float = {i for indices in island_ops(named).values() for i in indices}
    on_purpose = left_to_tflite_on_purpose(named)  # large depthwise convs: TFLite's kernel is the faster one
    left = []
    for index, op in enumerate(graph.operators):
        name = flatbuffer.builtin_name(flatbuffer.builtin_code(named, op))
        if index in delegated or index in already_float or index in on_purpose or name in _IO_OPS or not len(op.outputs):
            continue
        owner = module(op.outputs[0])
        if owner is None:
            continue
        consumers = {module(reader.outputs[0]) for reader in graph.operators
                     if len(reader.outputs) and set(reader.inputs) & set(op.outputs)}
        left.append(LeftOut(name, owner, frozenset(consumers - {None, owner})))
    return left


def as_written(model_t, keep_weights_constant: bool = False):
    """A copy of a converted model in the forms export writes for XNNPACK (``keep_weights_constant``: those of
    a ``require_gpu`` export)."""
    written = copy.deepcopy(model_t)
    use_xnnpack_forms(written, keep_weights_constant)
    return written


MIN_GAIN = 0.05  # a candidate with more modules float is kept only if this much faster


def keep_float_where_xnnpack_lacks_int8(convert: Callable[[frozenset[str]], tuple], float_model: nn.Module, converted: tuple,
                                        keep_weights_constant: bool = False
                                        ) -> tuple[tuple, frozenset[str], list[LeftOut], str]:
    """``float_fallback="xnnpack"``: the fastest file on XNNPACK among the all-int8 one (``converted``, from
    ``convert(frozenset())`` -> (model_t, ...)), one with the modules whose int8 ops XNNPACK leaves out kept
    float (in float, XNNPACK runs LayerNorm and attention), and one that also keeps float the modules
    reading from what is still left out: the converter fuses a lone unannotated op between two
    quantized neighbours back into int8 (GELU between two linears). Float costs compute where int8
    costs hand-overs to TFLite's kernels, so the candidates are timed, not counted. Returns the chosen
    result, the modules kept float, what XNNPACK still leaves out there, and a note with the timings. Each
    candidate is timed in the forms it would be written in (``keep_weights_constant``: a ``require_gpu`` export's)."""
    left = int8_ops_xnnpack_leaves_out(converted[0], float_model, keep_weights_constant)
    kept = frozenset(item.module for item in left)
    if not kept:
        return converted, kept, left, ""
    candidates = [(converted, frozenset(), left)]
    narrow = convert(kept)
    candidates.append((narrow, kept, int8_ops_xnnpack_leaves_out(narrow[0], float_model, keep_weights_constant)))
    wider = kept | {module for item in candidates[-1][2] for module in item.consumers}
    if wider != kept:
        wide = convert(wider)
        candidates.append((wide, wider, int8_ops_xnnpack_leaves_out(wide[0], float_model, keep_weights_constant)))
    files = {str(i): flatbuffer.write_model(as_written(result[0], keep_weights_constant)) for i, (result, _, _) in enumerate(candidates)}
    seconds = median_latencies(files, rounds=5, runs_per_round=10)
    latency = [seconds[str(i)] * 1e3 for i in range(len(candidates))]
    # More float must win clearly: a near tie would make the same model export differently run to run.
    best = 0
    for index in range(1, len(candidates)):
        if latency[index] < latency[best] * (1 - MIN_GAIN):
            best = index
    result, float_modules, left = candidates[best]
    timed = "; ".join(f"{len(modules)} module(s) float: {ms:.3f} ms" for (_, modules, _), ms in zip(candidates, latency))
    return result, float_modules, left, f"float_fallback='xnnpack' timed each candidate on XNNPACK (1 thread): {timed}"


def xnnpack_fallback_notes(kept_float: frozenset[str], left: list[LeftOut], timings: str) -> list[str]:
    """For the report: what ``float_fallback="xnnpack"`` did (the candidates' timings, the modules it
    kept float) and, in any mode, the int8 ops XNNPACK leaves to TFLite's kernels."""
    notes = [timings] if timings else []
    if kept_float:
        notes.append(f"float_fallback='xnnpack': kept float the ops of {len(kept_float)} module(s) whose int8 ops "
                     f"XNNPACK leaves to TFLite's kernels (or that read from one): {', '.join(sorted(kept_float))}")
    if left:
        shown = sorted({f"{item.op} ({item.module or 'the top-level forward'})" for item in left})
        notes.append(f"XNNPACK leaves these int8 ops to TFLite's kernels, each a break in its graph: {', '.join(shown)}")
    return notes
