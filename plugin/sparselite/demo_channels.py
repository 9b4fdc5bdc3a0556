"""``sparselite demo --channels``: the channel-pruned int8 file next to the default demo's dense and sparse ones.

Trains ``recipes/channels50_qat_export.yaml`` (50% of channels removed, then QAT, then int8 export) with
the same config as the default demo, and adds its accuracy, size and XNNPACK latency to the demo's table.
The default demo (without ``--channels``) does not run any of this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from sparselite.runtime.litert import LiteRTModel

CHANNEL_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "channels50_qat_export.yaml"


def fit_channels(out_dir: Path, test_loader: DataLoader) -> dict[str, Any]:
    """Train and export the channel recipe into ``out_dir``; returns its accuracy, bytes and report numbers."""
    from sparselite.demo import _fit, _recipe_exporting_to
    from sparselite.export.callback import TFLiteExport

    print("[demo] +  50% channel pruning + QAT + int8 export (--channels)")
    path = out_dir / "channels50_int8.tflite"
    root = out_dir / "channels50_qat"
    cli = _fit(_recipe_exporting_to(path, root / "recipe.yaml", CHANNEL_RECIPE), root)
    report = next(cb for cb in cli.trainer.callbacks if isinstance(cb, TFLiteExport)).report
    return {"path": str(path), "bytes": path.stat().st_size, "accuracy": LiteRTModel(path).evaluate(test_loader)["accuracy"],
            "parity_top1_agreement": report.parity.top1_agreement if report.parity else None, "channel_report": report.channels}


def table_rows(s: dict[str, Any]) -> list[str]:
    c, lat = s["channels"], s["latency_ms"]
    return [
        "-" * 72,
        "channel pruning (--channels): 50% of channels removed, then QAT, int8 (.tflite, XNNPACK)",
        f"{'  top-1 accuracy':<44}{c['accuracy']:>12.2%}",
        f"{'  file bytes (vs int8 dense storage)':<44}{c['bytes']:>12,}{c['bytes'] / s['bytes']['int8_dense_tflite']:>11.2f}x",
        f"{'  latency median ms (vs int8 sparse file)':<44}{lat['int8_channels']['median_ms']:>12.3f}"
        f"{lat['int8_channels']['median_ms'] / lat['int8']['median_ms']:>11.2f}x",
        "  fewer channels is a smaller dense model: faster on every runtime, unlike sparsity on x86.",
    ]
