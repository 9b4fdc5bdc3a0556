"""The exported file against the fp32 file of the same weights: bytes, and XNNPACK latency timed in one run.

The fp32 file is the float model the export started from (fake-quant and masks stripped, BN folded),
converted and given the same XNNPACK forms as the export (``export_float_tflite``), so the ratio compares
precision and storage only. Both files are timed interleaved, 1 thread, batch 1, medians: a ratio from
one run on one machine, which is what the report quotes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROUNDS, RUNS_PER_ROUND, WARMUP = 7, 10, 5


def compare_with_fp32(module: nn.Module, example_inputs: torch.Tensor, exported: str | Path,
                      keep_weights_constant: bool = False) -> dict[str, Any]:
    """``{"fp32_bytes", "latency": {"ms", "fp32_ms", "ratio", "setting"}}`` for the file at ``exported``
    (``keep_weights_constant``: as a ``require_gpu`` export writes its forms)."""
    from sparselite.export.conversion import export_float_tflite
    from sparselite.runtime.bench import interleaved_benchmark

    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "fp32.tflite"
        fp32_bytes = export_float_tflite(module, example_inputs, fp32_path, keep_weights_constant)
        timed = interleaved_benchmark({"fp32": str(fp32_path), "file": str(exported)}, threads=1, warmup=WARMUP,
                                      rounds=ROUNDS, runs_per_round=RUNS_PER_ROUND)
    file_ms, fp32_ms = timed["file"].median_ms, timed["fp32"].median_ms
    return {"fp32_bytes": fp32_bytes,
            "latency": {"ms": file_ms, "fp32_ms": fp32_ms, "ratio": file_ms / fp32_ms,
                        "setting": f"XNNPACK, 1 thread, batch 1, median of {ROUNDS}x{RUNS_PER_ROUND} runs interleaved "
                                   "with the fp32 file of the same weights, on the exporting machine"}}
