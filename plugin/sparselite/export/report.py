"""``ExportReport``: what an export produced and what it measured, as an object and as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from sparselite.tflite.flatbuffer import write_atomically


def report_path(tflite_path: str | Path) -> Path:
    """Where an export's JSON report goes: next to the file, ``model.tflite`` -> ``model.json``."""
    return Path(tflite_path).with_suffix(".json")


GATE_RULE = ("top-1 agreement over the examples where neither the file nor the torch model has a tied top "
             "logit must reach min_agreement, or (for a model that amplifies int8 rounding) reach the agreement "
             "of XNNPACK with TFLite's builtin kernels on the same file, when that is at least 90%; a reference "
             "that predicts one class, gives every example the same logits, or ties its top logit on more than "
             "10% of the examples (a saturated output range) is flagged: agreement with a dead or clipped model "
             "proves nothing")


def shortened(names: list[str], shown: int = 4) -> str:
    """'a, b, c, d and 3 more': module lists in one line."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


@dataclass
class Parity:
    """The exported file against the torch model it came from, on held-out batches."""

    examples: int
    top1_agreement: float  # over the examples without an exact tie for the top logit (the gate's measure)
    max_logit_diff_lsb: float  # in steps of the int8 output scale
    output_scale: float
    reference: str  # "fake-quant" (QAT ranges), "float" (post-training calibration), "simulated-precision" (float activations)
    ties_excluded: int = 0  # examples whose top logit was tied in the file or the torch model
    top1_agreement_all: float | None = None  # over every example, ties counted as they fall
    degenerate_reference: str | None = None  # why the torch model looks dead (then agreement means nothing)
    # The same file on XNNPACK vs on TFLite's builtin kernels: the runtime's own rounding noise (export/parity.py).
    kernel_agreement: float | None = None
    kernel_max_lsb: float | None = None
    rule: str = GATE_RULE
    # With the verification batches' labels: the top-1 accuracy of the torch model compared and of the file.
    reference_top1: float | None = None
    file_top1: float | None = None

    @property
    def trustworthy(self) -> bool:
        return self.degenerate_reference is None


# What may stay float in an export: False, nothing (the export fails, naming the ops); True, ops with
# no int8 TFLite kernel; "xnnpack", also the modules whose int8 ops XNNPACK does not delegate.
FloatFallback = Union[bool, Literal["xnnpack"]]
FLOAT_FALLBACKS = (False, True, "xnnpack")


@dataclass
class FloatIsland:
    """Ops left in float in a mixed-precision file (``float_fallback=True``)."""

    op: str  # TFLite op type
    count: int
    modules: list[str]  # the torch modules they come from
    # Their median XNNPACK latency, timed alone, over the whole file's (runtime/op_cost.py: an estimate).
    latency_share: float | None = None


@dataclass
class LayerSparsity:
    layer: str  # torch module name
    tensor: str  # TFLite tensor name
    sparsity_in_file: float
    sparsity_in_training: float | None


@dataclass
class ExportReport:
    path: str
    file_bytes: int
    io_dtype: str
    ranges_learned: int
    ranges_calibrated: int
    ranges_derived: int = 0  # follow from a learned range by interval arithmetic (x + 3 inside hardsigmoid)
    ranges_fixed: int = 0  # set by the int8 kernel (LOGISTIC, SOFTMAX, TANH outputs)
    calibrated_ranges: dict[str, str] = field(default_factory=dict)  # observer -> why no QAT range applied
    parity: Parity | None = None
    layers: list[LayerSparsity] = field(default_factory=list)
    overall_sparsity_in_file: float | None = None
    sparse_encoding: list[dict[str, Any]] = field(default_factory=list)
    dense_int8_bytes: int | None = None  # the same export with dense weight storage
    xz_bytes: int | None = None
    dense_int8_xz_bytes: int | None = None  # compressed downloads: compare this with xz_bytes
    gpu: dict[str, Any] | None = None
    float_islands: list[FloatIsland] = field(default_factory=list)
    float_islands_latency_share: float | None = None  # every island op and the (DE)QUANTIZE ops at their borders
    notes: list[str] = field(default_factory=list)
    channels: dict[str, Any] | None = None  # channel pruning: params, MACs, latency before/after (channel_report.py)
    sha256: str | None = None  # of the file as written: a report describes exactly one file
    precision: Any = "int8"  # the export's precision option (a name, or a mapping of module regexes)
    layer_precisions: dict[str, str] = field(default_factory=dict)  # weight layer -> precision, files not fully int8
    precision_choice: dict | None = None  # precision='auto': what it measured and chose (auto_precision.PrecisionChoice)
    # Top-1 on the verification batches, when their labels are known: {"fp32", "fake_quant" (QAT runs), "file", "examples"}
    accuracy: dict | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time of each export stage (stages.py)
    # Against the fp32 file of the same weights (fp32_comparison.py; exports with a report page):
    fp32_bytes: int | None = None
    latency: dict | None = None  # {"ms", "fp32_ms", "ratio", "setting"}: XNNPACK medians from one interleaved run
    # Each op type's and weight layer's share of the file's XNNPACK latency, timed alone (html_report.time_latency_shares)
    latency_shares: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> None:
        write_atomically(path, self.to_json().encode())

    def summary(self) -> str:
        lines = [f"{self.path}: {self.file_bytes / 1024:.1f} KiB, {self.io_dtype} I/O, "
                 f"{self.ranges_learned} learned + {self.ranges_derived} derived + {self.ranges_fixed} fixed + "
                 f"{self.ranges_calibrated} calibrated activation ranges"]
        if self.precision_choice:
            chosen = self.precision_choice["precision"]
            dynamic = sum(layer["precision"] == "dynamic_int8" for layer in self.precision_choice["layers"])
            rest = "int8" if self.precision_choice["file"] == "int8+dynamic" else "fp32"
            what = "the fully int8 file" if chosen == "int8" else f"{dynamic} of {len(self.precision_choice['layers'])} " \
                                                                   f"weight layers dynamic_int8, the rest {rest}"
            lines.append(f"  precision auto chose {what}; the same file without measuring: precision={chosen!r}")
        if self.parity:
            p = self.parity
            ties = f" ({p.ties_excluded} tied examples excluded)" if p.ties_excluded else ""
            lines.append(f"  parity vs {p.reference} torch on {p.examples} examples: top-1 agreement "
                         f"{p.top1_agreement:.2%}{ties}, max |logit diff| {p.max_logit_diff_lsb:.1f} LSB")
            if p.kernel_agreement is not None:
                lines.append(f"  noise floor: XNNPACK vs TFLite's builtin kernels on the same file agree on "
                             f"{p.kernel_agreement:.2%}, max |logit diff| {p.kernel_max_lsb:.1f} LSB")
            if not p.trustworthy:
                lines.append(f"  WARNING: parity proves nothing here: the torch model {p.degenerate_reference}; "
                             "train longer or check the model before shipping this file")
        if self.accuracy:
            kinds = [(key, label) for key, label in (("fp32", "fp32"), ("fake_quant", "fake-quant"), ("file", "the file"))
                     if self.accuracy.get(key) is not None]
            lines.append(f"  top-1 on {self.accuracy['examples']} labelled verification examples: "
                         + ", ".join(f"{label} {self.accuracy[key]:.2%}" for key, label in kinds))
        for island in self.float_islands:
            cost = "" if island.latency_share is None else f" ({island.latency_share:.0%} of the XNNPACK latency, timed alone)"
            lines.append(f"  float island: {island.count} x {island.op} from {shortened(island.modules)}{cost}")
        if self.float_islands_latency_share is not None:
            lines.append(f"  float islands with their QUANTIZE/DEQUANTIZE borders: {self.float_islands_latency_share:.0%} "
                         "of the XNNPACK latency, timed alone")
        if self.xz_bytes is not None:
            size = f"  size: {self.file_bytes:,} B (xz -9: {self.xz_bytes:,} B)"
            if self.dense_int8_bytes is not None and self.dense_int8_bytes != self.file_bytes:
                size += f"; with dense weight storage {self.dense_int8_bytes:,} B (xz -9: {self.dense_int8_xz_bytes:,} B)"
            lines.append(size)
        if self.latency:
            lines.append(f"  XNNPACK latency {self.latency['ms']:.3f} ms vs the fp32 file's {self.latency['fp32_ms']:.3f} ms "
                         f"({self.latency['ratio']:.2f}x; 1 thread, medians of one interleaved run); fp32 file "
                         f"{self.fp32_bytes:,} B")
        if self.overall_sparsity_in_file is not None:
            lines.append(f"  sparsity read from the file: {self.overall_sparsity_in_file:.1%} over {len(self.layers)} pruned layers")
        if self.channels:
            c = self.channels
            lines.append(f"  channel pruning: params {c['params_before']:,} -> {c['params_after']:,}, MACs {c['macs_before']:,} -> "
                         f"{c['macs_after']:,} ({c['mac_ratio']:.2f}x), int8 XNNPACK latency {c['latency_ms_before']:.3f} -> "
                         f"{c['latency_ms_after']:.3f} ms ({c['latency_ratio']:.2f}x)")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)
