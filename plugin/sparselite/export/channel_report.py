"""Before/after numbers for a channel-pruned export: parameters, MACs and int8 XNNPACK latency.

"Before" is the same architecture at full width (the model as ``ChannelPruner.prepare`` saw it), exported
to int8 with post-training calibration: dense int8 kernels cost the same whatever the weights are, so its
latency is the unpruned model's. Both files are timed in one interleaved run (1 thread, medians).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sparselite.pruning.channels import ChannelPruner


def compare_with_unpruned(pruner: ChannelPruner, example_inputs: torch.Tensor, int8_path: str | Path,
                          calibration: Sequence[torch.Tensor], rounds: int = 5, runs_per_round: int = 20) -> dict[str, Any]:
    from sparselite.export.tflite import export_tflite
    from sparselite.runtime.bench import interleaved_benchmark

    after = pruner.size()
    with tempfile.TemporaryDirectory() as tmp:
        unpruned_path = Path(tmp) / "unpruned_int8.tflite"
        export_tflite(pruner.unpruned_copy(), example_inputs, unpruned_path, calibration_data=list(calibration)[:2],
                      sparse=False, min_agreement=0.0)
        latency = interleaved_benchmark({"before": str(unpruned_path), "after": str(int8_path)}, threads=1,
                                        rounds=rounds, runs_per_round=runs_per_round)
    return {
        "removed_channels": pruner.channel_ratio()["overall"],
        "params_before": pruner.before["params"], "params_after": after["params"],
        "macs_before": pruner.before["macs"], "macs_after": after["macs"],
        "mac_ratio": after["macs"] / pruner.before["macs"],
        "latency_ms_before": latency["before"].median_ms, "latency_ms_after": latency["after"].median_ms,
        "latency_ratio": latency["after"].median_ms / latency["before"].median_ms,
        "latency_setting": f"XNNPACK, 1 thread, batch 1, {rounds}x{runs_per_round} interleaved runs; before = full-width int8 (calibrated)",
    }
