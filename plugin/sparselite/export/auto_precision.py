"""``precision="auto"``: each layer's precision, chosen from measured XNNPACK latency and the model's
accuracy on the verification batches.

1. Which layers can be dynamic-range: the pass writes every layer that is not depthwise as
   ``dynamic_int8``; the ones whose op has no such kernel (a DEPTHWISE_CONV_2D, which a one-channel conv
   also becomes) come back fp32 ("no kernel").
2. Which are faster so: each candidate layer's ops are cut out of the fp32 file and of the all-dynamic
   file (``op_cost.ops_alone``: an RNN's weight with all the time steps that read it) and timed alone,
   interleaved. A layer stays dynamic only below ``FASTER`` of its fp32 time ("not faster" otherwise: a
   small layer pays more for quantizing its input than it saves).
3. Which the accuracy tolerates: each remaining layer alone dynamic, simulated in torch as the file
   computes it (``precision.precision_reference``, exact to float rounding), on the verification
   batches: the top-1 points it loses (``TopOneLoss``: in accuracy when the batches' labels are known,
   else in agreement with the float model) and its logit error. With all of them dynamic, while the
   loss exceeds ``max_accuracy_drop`` points, the layer with the largest logit error goes back to fp32
   ("sensitive").
4. The whole file: the mixed file, the fp32 file, the "widest" file (every layer with the kernel
   dynamic-range but the sensitive ones, when that differs and keeps the budget) and, when the model has
   QAT ranges or calibration batches, the int8 file (float kept where XNNPACK has no int8 kernel) are
   timed whole, interleaved; where that int8 file keeps layers with weights float (a transformer's
   attention between float softmax and norms), also the int8 file with those layers dynamic-range
   ("int8+dynamic": int8 and dynamic-range layers in one file). Whole-file timing counts what timing
   alone misses: XNNPACK's fusions, the cost of the QUANTIZE/DEQUANTIZE pairs at int8/float borders, the
   delegate's hand-overs. The widest file replaces the per-layer choice when it is faster whole; the
   faster of the two int8 files within the budget wins when it is no slower than the better
   float-activation file (a CNN's usual outcome: the fully int8 file). A dynamic-range layer has no
   border: its op quantizes its own input.

fp16 is never chosen: XNNPACK on x86 unpacks fp16 weights to fp32 at load, so it is no faster here
(ask for it by name for the GPU or for half the file).

The choice (``PrecisionChoice``) is printed as a table, written in the export report, and turns into an
explicit precision (``as_precision``) that reproduces the same file without measuring again. It is kept
in the checkpoint (``CHECKPOINT_KEY``: ``TFLiteExport`` writes it into the run's last checkpoint,
``sparselite export`` into the checkpoint it read), and a later ``precision="auto"`` export of that
checkpoint reuses it instead of measuring again: timings vary from run to run, a shipped choice should not.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from ai_edge_litert import schema_py_generated as schema
from torch import nn

from sparselite.errors import SparseliteError
from sparselite.export.precision import (
    DEFAULT_KEY, LayerFinder, PrecisionSpec, _DYNAMIC_OPS, _WEIGHT_OPS, _float_values, precision_reference, weight_layers,
)
from sparselite.quantization.layer_precision import is_depthwise
from sparselite.module_copy import detached_copy
from sparselite.runtime.op_cost import median_latencies, ops_alone
from sparselite.tflite.flatbuffer import builtin_code, builtin_name, read_model

log = logging.getLogger("sparselite")

CHECKPOINT_KEY = "sparselite_precision_choice"  # a checkpoint's entry: PrecisionChoice.to_dict()
FASTER = 0.9  # a dynamic-range layer must take under this share of its fp32 time (timing noise is a few %)
DEFAULT_MAX_ACCURACY_DROP = 0.5  # top-1 points against the float model


@dataclass(frozen=True)
class LayerChoice:
    layer: str
    op: str  # the file's op(s) reading the weight, e.g. "FULLY_CONNECTED x28" for a GRU's
    precision: str
    reason: str
    fp32_share: float | None = None  # its ops alone, as a share of the fp32 file's latency
    dynamic_vs_fp32: float | None = None  # its ops alone: dynamic-range time / fp32 time
    flips_alone: float | None = None  # top-1 points lost with only this layer dynamic-range (``TopOneLoss``)
    logit_error_alone: float | None = None  # relative logit error (L2) with only this layer dynamic-range


INT8_DYNAMIC = "int8+dynamic"  # the int8 file, its float islands' layers dynamic-range
_FILE_NAMES = {"int8": "fully int8 file", INT8_DYNAMIC: "int8 file with dynamic-range islands"}


@dataclass
class PrecisionChoice:
    # "int8": the fully int8 file; "int8+dynamic": it, with the layers of its float islands dynamic-range;
    # "mixed": the per-layer float-activation precisions below
    file: str
    layers: list[LayerChoice]
    latency_vs_fp32: dict[str, float]  # candidate file -> whole-file latency over the fp32 file's
    top1_drop: dict[str, float]  # candidate file -> top-1 points lost against the float model (``TopOneLoss``)
    max_accuracy_drop: float
    measured_in: str  # "accuracy" (the batches' labels) or "agreement with the float model"
    notes: list[str] = field(default_factory=list)

    def as_precision(self) -> PrecisionSpec:
        """The explicit precision that gives this file again: 'int8', or one entry per layer that differs
        from the file's default."""
        if self.file == "int8":
            return "int8"
        default = "int8" if self.file == INT8_DYNAMIC else "fp32"
        return {DEFAULT_KEY: default, **{re.escape(c.layer): c.precision for c in self.layers if c.precision != default}}

    def to_dict(self) -> dict:
        return {**asdict(self), "precision": self.as_precision()}

    def table(self) -> str:
        lines = [f"precision auto: the {_FILE_NAMES.get(self.file, 'mixed-precision file')} "
                 f"({', '.join(f'{k} {v:.2f}x' for k, v in self.latency_vs_fp32.items())} fp32 latency; "
                 f"top-1 drop in {self.measured_in}: {', '.join(f'{k} {v:.2f}' for k, v in self.top1_drop.items())} "
                 f"points, budget {self.max_accuracy_drop:g})",
                 f"  {'layer':<32} {'op':<22} {'precision':<13} reason"]
        for c in self.layers:
            lines.append(f"  {c.layer[-32:]:<32} {c.op[:22]:<22} {c.precision:<13} {c.reason}")
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


def stored_choice(checkpoint: dict) -> dict | None:
    """The choice an earlier ``precision="auto"`` export stored in this checkpoint, if any."""
    return checkpoint.get(CHECKPOINT_KEY)


def store_choice(checkpoint_path: str | Path, choice: dict) -> None:
    """Add the choice to a checkpoint file, which is replaced atomically (weights untouched)."""
    import io

    from sparselite.tflite.flatbuffer import write_atomically

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    checkpoint[CHECKPOINT_KEY] = choice
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    write_atomically(checkpoint_path, buffer.getvalue())


BuildFile = Callable[[PrecisionSpec], tuple[bytes, dict[str, str]]]  # precision -> (file, precisions written)


def choose_precision(float_model: nn.Module, build: BuildFile, int8_file: Callable[[], bytes] | None,
                     batches: Sequence[torch.Tensor], labels: torch.Tensor | None, max_accuracy_drop: float,
                     threads: int = 1, rounds: int = 5, runs_per_round: int = 10) -> PrecisionChoice:
    """Measure and choose (module docstring). ``build`` makes a float-activation file of a precision;
    ``int8_file`` the fully int8 file (None: the model has no ranges to make one); ``labels``: the
    batches' labels, if known (``TopOneLoss``)."""
    layers = weight_layers(float_model)
    fp32_file, _ = build("fp32")
    dynamic_file, written = build(_dynamic([name for name in layers if not is_depthwise(layers[name])]))
    fp32_t, dynamic_t = read_model(fp32_file), read_model(dynamic_file)
    ops = _ops_of_layers(fp32_t, float_model, layers)
    candidates = [name for name in layers if written.get(name) == "dynamic_int8" and ops.get(name)]

    timing = {"threads": threads, "rounds": rounds, "runs_per_round": runs_per_round}
    seconds = _time_alone(fp32_file, fp32_t, dynamic_t, {name: ops[name] for name in candidates}, timing)

    loss = TopOneLoss(_float_outputs(float_model, batches), labels)
    choices: dict[str, LayerChoice] = {}
    faster = []
    for name in layers:
        op = _op_summary(fp32_t, ops.get(name, []))
        if name not in candidates:
            choices[name] = LayerChoice(name, op, "fp32", f"no dynamic-range kernel for {op or 'its op'}")
            continue
        ratio = seconds[f"{name}/dynamic"] / seconds[f"{name}/fp32"]
        share = seconds[f"{name}/fp32"] / seconds["fp32"]
        if ratio >= FASTER:
            choices[name] = LayerChoice(name, op, "fp32", f"dynamic_int8 not faster ({ratio:.2f}x)", share, ratio)
            continue
        flips, error = _effect(float_model, {name: "dynamic_int8"}, batches, loss)
        choices[name] = LayerChoice(name, op, "dynamic_int8", f"faster ({ratio:.2f}x its fp32 time)", share, ratio,
                                    flips, error)
        faster.append(name)

    log.info("precision auto: %d layers faster dynamic-range; checking the accuracy budget", len(faster))
    chosen, drop = _within_budget(float_model, choices, faster, batches, loss, max_accuracy_drop)
    return _choose_files(float_model, build, int8_file, batches, loss, choices, candidates, chosen, drop,
                         {"fp32": fp32_file, "dynamic": dynamic_file}, max_accuracy_drop, timing)


def _time_alone(fp32_file: bytes, fp32_t, dynamic_t, ops: dict[str, list[int]], timing: dict) -> dict[str, float]:
    """Median seconds of each layer's ops cut out of the fp32 and the dynamic-range file, and of the fp32 file."""
    log.info("precision auto: timing %d layers alone in fp32 and dynamic-range int8", len(ops))
    files = {"fp32": fp32_file}
    for name, indices in ops.items():
        files[f"{name}/fp32"] = ops_alone(fp32_t, indices)
        files[f"{name}/dynamic"] = ops_alone(dynamic_t, indices)  # the pass adds no op: the same indices
    return median_latencies(files, **timing)


def _within_budget(float_model: nn.Module, choices: dict[str, LayerChoice], faster: list[str],
                   batches: Sequence[torch.Tensor], loss: TopOneLoss, max_accuracy_drop: float) -> tuple[list[str], float]:
    """The faster layers, less the most sensitive ones until the loss fits the budget (their rows say so)."""
    chosen = sorted(faster, key=lambda name: choices[name].logit_error_alone)
    drop, _ = _effect(float_model, {name: "dynamic_int8" for name in chosen}, batches, loss)
    while chosen and drop > max_accuracy_drop:
        worst = chosen.pop()
        c = choices[worst]
        choices[worst] = LayerChoice(worst, c.op, "fp32", f"sensitive ({c.logit_error_alone:.3f} logit error alone, "
                                     f"{c.flips_alone:.2f} top-1 points lost)", c.fp32_share, c.dynamic_vs_fp32,
                                     c.flips_alone, c.logit_error_alone)
        drop, _ = _effect(float_model, {name: "dynamic_int8" for name in chosen}, batches, loss)
    return chosen, drop


def _choose_files(float_model: nn.Module, build: BuildFile, int8_file: Callable[[], bytes] | None,
                  batches: Sequence[torch.Tensor], loss: TopOneLoss, choices: dict[str, LayerChoice],
                  candidates: list[str], chosen: list[str], drop: float, made: dict[str, bytes],
                  max_accuracy_drop: float, timing: dict) -> PrecisionChoice:
    """Step 4 (module docstring): the candidate files timed whole, and the choice among them."""
    fp32_file, dynamic_file = made["fp32"], made["dynamic"]
    sensitive = {name for name, c in choices.items() if c.reason.startswith("sensitive")}
    wholes = {"fp32": fp32_file, "mixed": build(_dynamic(chosen))[0] if chosen else fp32_file}
    notes, top1_drop = [], {"mixed": drop}
    # Timing alone misses what a layer's neighbours make of it (XNNPACK fuses, and a float op between two
    # dynamic-range ones is no border at all): every layer with the kernel, but the sensitive ones, is
    # also tried whole, and wins over the per-layer choice when faster within the budget.
    widest = [name for name in candidates if name not in sensitive]
    if set(widest) != set(chosen):
        top1_drop["widest"], _ = _effect(float_model, {name: "dynamic_int8" for name in widest}, batches, loss)
        if top1_drop["widest"] <= max_accuracy_drop:
            wholes["widest"] = dynamic_file if set(widest) == set(candidates) else build(_dynamic(widest))[0]
    island_layers = _add_int8_files(float_model, build, int8_file, batches, loss, wholes, top1_drop, notes)
    log.info("precision auto: timing the candidate files whole")
    whole_seconds = median_latencies(wholes, **timing)
    latency = {name: whole_seconds[name] / whole_seconds["fp32"] for name in wholes if name != "fp32"}
    if "widest" in latency and latency["widest"] < latency["mixed"]:
        for name in set(widest) - set(chosen):
            c = choices[name]
            choices[name] = LayerChoice(name, c.op, "dynamic_int8", f"the file is faster whole with it ({latency['widest']:.2f}x "
                                        f"fp32, {latency['mixed']:.2f}x without; alone {c.dynamic_vs_fp32:.2f}x)",
                                        c.fp32_share, c.dynamic_vs_fp32, c.flips_alone, c.logit_error_alone)
        latency["mixed"], top1_drop["mixed"] = latency["widest"], top1_drop["widest"]
    elif "widest" in top1_drop:
        notes.append("every layer with the kernel dynamic-range (but the sensitive ones) was tried whole: "
                     + ("not faster" if "widest" in latency else f"over the budget ({top1_drop['widest']:.2f} points)"))
    latency.pop("widest", None)
    top1_drop.pop("widest", None)
    int8_files = [name for name in ("int8", INT8_DYNAMIC) if name in latency]
    within = [name for name in int8_files if top1_drop[name] <= max_accuracy_drop]
    best = min(within, key=latency.__getitem__, default=None)
    int8_wins = best is not None and latency[best] <= latency["mixed"]
    for name in int8_files:
        if not int8_wins or name != best:
            why = (f"over the accuracy budget ({top1_drop[name]:.2f} points)" if name not in within
                   else f"slower than the {'mixed' if not int8_wins else best} file")
            notes.append(f"the {_FILE_NAMES[name]} was not taken: {why}")
    if int8_wins:
        why = f"the {_FILE_NAMES[best]}: {latency[best]:.2f}x fp32, {latency['mixed']:.2f}x for the mixed one"
        rows = [LayerChoice(c.layer, c.op, "dynamic_int8", f"float in the int8 file (no int8 kernel around it on XNNPACK), "
                            f"dynamic-range; {why}", c.fp32_share) if best == INT8_DYNAMIC and c.layer in island_layers
                else LayerChoice(c.layer, c.op, "int8", why, c.fp32_share) for c in choices.values()]
        return PrecisionChoice(best, rows, latency, top1_drop, max_accuracy_drop, loss.measure, notes)
    return PrecisionChoice("mixed", list(choices.values()), latency, top1_drop, max_accuracy_drop, loss.measure, notes)


def _add_int8_files(float_model: nn.Module, build: BuildFile, int8_file: Callable[[], bytes] | None,
                    batches: Sequence[torch.Tensor], loss: TopOneLoss, wholes: dict[str, bytes],
                    top1_drop: dict[str, float], notes: list[str]) -> list[str]:
    """Add the int8 file, and the int8 file with its float islands' layers dynamic-range, to ``wholes``
    (with their top-1 drops); returns those layers."""
    if int8_file is None:
        notes.append("the fully int8 file was not tried: the model has no QAT ranges and no calibration batches")
        return []
    try:
        wholes["int8"] = int8_file()
        top1_drop["int8"] = loss(_file_outputs(wholes["int8"], batches))
    except SparseliteError as err:
        notes.append(f"the fully int8 file could not be made: {err}")
        return []
    island_layers = _float_weight_layers(wholes["int8"], float_model)
    if island_layers:  # the int8 file keeps them float (no int8 kernel around them): dynamic-range there
        try:
            wholes[INT8_DYNAMIC] = build(_int8_but(island_layers))[0]
            top1_drop[INT8_DYNAMIC] = loss(_file_outputs(wholes[INT8_DYNAMIC], batches))
        except SparseliteError as err:
            notes.append(f"the {_FILE_NAMES[INT8_DYNAMIC]} could not be made: {err}")
    return island_layers


def _float_weight_layers(content: bytes, float_model: nn.Module) -> list[str]:
    """The layers whose FULLY_CONNECTED or CONV_2D weights an int8 file keeps float (its float islands)."""
    model = read_model(content)
    subgraph = model.subgraphs[0]
    find = LayerFinder(float_model, weight_layers(float_model))
    found: list[str] = []
    for op in subgraph.operators:
        weight = subgraph.tensors[int(op.inputs[1])] if builtin_code(model, op) in _DYNAMIC_OPS and len(op.inputs) > 1 else None
        if weight is None or weight.type != schema.TensorType.FLOAT32 or model.buffers[weight.buffer].data is None:
            continue
        layer = find(weight.name.decode(), _float_values(model, weight))
        if layer is not None and layer not in found:
            found.append(layer)
    return found


def _int8_but(layers: Sequence[str]) -> dict[str, str]:
    """The precision mapping of the int8 file with ``layers`` dynamic-range in it."""
    return {DEFAULT_KEY: "int8", **{re.escape(name): "dynamic_int8" for name in layers}}


def _dynamic(layers: Sequence[str]) -> dict[str, str]:
    """The precision mapping that makes ``layers`` dynamic-range and every other layer fp32."""
    return {DEFAULT_KEY: "fp32", **{re.escape(name): "dynamic_int8" for name in layers}}

def _ops_of_layers(model: schema.ModelT, float_model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, list[int]]:
    """Layer -> the indices of the ops that read its weight directly (several for an RNN's steps)."""
    find_layer = LayerFinder(float_model, layers)
    subgraph, found, ops = model.subgraphs[0], {}, {}
    for index, op in enumerate(subgraph.operators):
        if builtin_code(model, op) not in _WEIGHT_OPS or len(op.inputs) < 2:
            continue
        weight_index = int(op.inputs[1])
        weight = subgraph.tensors[weight_index]
        if weight.type != schema.TensorType.FLOAT32 or model.buffers[weight.buffer].data is None:
            continue
        if weight_index not in found:
            found[weight_index] = find_layer(weight.name.decode(), _float_values(model, weight))
        if found[weight_index] is not None:
            ops.setdefault(found[weight_index], []).append(index)
    return ops


def _op_summary(model: schema.ModelT, indices: list[int]) -> str:
    names = sorted({builtin_name(builtin_code(model, model.subgraphs[0].operators[i])) for i in indices})
    return "/".join(names) + (f" x{len(indices)}" if len(indices) > 1 else "")


@torch.no_grad()
def _float_outputs(model: nn.Module, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([model(batch).float().flatten(1) for batch in batches])


class TopOneLoss:
    """The top-1 points a candidate loses against the float model on the verification batches: in
    accuracy when their labels are known (a flip to the right class makes up for one to a wrong class,
    as in the user's accuracy), else in agreement (every example whose top-1 changes counts)."""

    def __init__(self, reference: torch.Tensor, labels: torch.Tensor | None) -> None:
        self.reference, self.labels = reference, labels
        self.measure = "accuracy" if labels is not None else "agreement with the float model"

    def __call__(self, outputs: torch.Tensor) -> float:
        if self.labels is None:
            return float(100.0 * (self.reference.argmax(1) != outputs.argmax(1)).float().mean())
        correct = (outputs.argmax(1) == self.labels).float().mean() - (self.reference.argmax(1) == self.labels).float().mean()
        return float(-100.0 * correct)

    def logit_error(self, outputs: torch.Tensor) -> float:
        return float((outputs - self.reference).norm() / self.reference.norm().clamp(min=1e-12))


@torch.no_grad()
def _effect(float_model: nn.Module, precisions: dict[str, str], batches: Sequence[torch.Tensor],
            loss: TopOneLoss) -> tuple[float, float]:
    """(top-1 points lost, relative L2 logit error) of the model with ``precisions``, simulated."""
    outputs = _float_outputs(precision_reference(detached_copy(float_model), precisions), batches)
    return loss(outputs), loss.logit_error(outputs)


def _file_outputs(content: bytes, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    from sparselite.runtime.litert import LiteRTModel

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "candidate.tflite"
        path.write_bytes(content)
        runtime = LiteRTModel(path)
        outputs = np.concatenate([runtime(batch.numpy()).reshape(len(batch), -1) for batch in batches])
    return torch.from_numpy(outputs).float()
