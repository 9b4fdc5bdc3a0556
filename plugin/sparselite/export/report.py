"""``ExportReport``: what an export produced and what it measured, as an object and as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Parity:
    """The exported file against the torch model it came from, on held-out batches."""

    examples: int
    top1_agreement: float
    max_logit_diff_lsb: float  # in steps of the int8 output scale
    output_scale: float
    reference: str  # "fake-quant" (QAT ranges) or "float" (post-training calibration)


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
    parity: Parity | None = None
    layers: list[LayerSparsity] = field(default_factory=list)
    overall_sparsity_in_file: float | None = None
    sparse_encoding: list[dict[str, Any]] = field(default_factory=list)
    dense_int8_bytes: int | None = None  # the same export with dense weight storage
    xz_bytes: int | None = None
    dense_int8_xz_bytes: int | None = None  # compressed downloads: compare this with xz_bytes
    gpu: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    channels: dict[str, Any] | None = None  # channel pruning: params, MACs, latency before/after (channel_report.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> None:
        from sparselite.export.flatbuffer import write_atomically

        write_atomically(path, self.to_json().encode())

    def summary(self) -> str:
        lines = [f"{self.path}: {self.file_bytes / 1024:.1f} KiB, {self.io_dtype} I/O, "
                 f"{self.ranges_learned} learned + {self.ranges_calibrated} calibrated activation ranges"]
        if self.parity:
            p = self.parity
            lines.append(f"  parity vs {p.reference} torch on {p.examples} examples: top-1 agreement "
                         f"{p.top1_agreement:.2%}, max |logit diff| {p.max_logit_diff_lsb:.1f} LSB")
        if self.xz_bytes is not None:
            size = f"  size: {self.file_bytes:,} B (xz -9: {self.xz_bytes:,} B)"
            if self.dense_int8_bytes is not None and self.dense_int8_bytes != self.file_bytes:
                size += f"; with dense weight storage {self.dense_int8_bytes:,} B (xz -9: {self.dense_int8_xz_bytes:,} B)"
            lines.append(size)
        if self.overall_sparsity_in_file is not None:
            lines.append(f"  sparsity read from the file: {self.overall_sparsity_in_file:.1%} over {len(self.layers)} pruned layers")
        if self.channels:
            c = self.channels
            lines.append(f"  channel pruning: params {c['params_before']:,} -> {c['params_after']:,}, MACs {c['macs_before']:,} -> "
                         f"{c['macs_after']:,} ({c['mac_ratio']:.2f}x), int8 XNNPACK latency {c['latency_ms_before']:.3f} -> "
                         f"{c['latency_ms_after']:.3f} ms ({c['latency_ratio']:.2f}x)")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)
