"""The default demo: a dense fp32 baseline, then that baseline compressed (80% GMP + QAT, distilled from it), both
exported and measured on LiteRT.

Runs the same configs and recipes a user would (``configs/fmnist_mobilenet.yaml`` with
``recipes/dense.yaml`` and ``recipes/gmp80_qat_distill_export.yaml``), then prints one table. The baseline
is trained once and cached under ``<out>/dense``. The compressed run starts from its weights
(``sparselite fit --initial_weights``: a model is compressed after it is trained) and learns from it as its
teacher (``Distillation``: the same cached weights, loaded into a float copy of the student).

The table shows the distilled file only: the same recipe without distillation is a second training run
(about as long as the rest of a cached demo), and ``benchmarks/distillation.py`` measures that comparison on
every recipe. ``run_demo(compare_distillation=True)`` trains it too and adds its row.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from sparselite.data.fashion_mnist import load_split
from sparselite.errors import SparseliteError
from sparselite.export.callback import TFLiteExport
from sparselite.export.parity import fake_quant_reference, verify
from sparselite.export.tflite import export_float_tflite
from sparselite.lightning_cli import build_lightning_cli
from sparselite.models.classifier import top1_accuracy
from sparselite.runtime.bench import interleaved_benchmark
from sparselite.runtime.litert import LiteRTModel

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "fmnist_mobilenet.yaml"
DENSE_RECIPE = REPO / "recipes" / "dense.yaml"
COMPRESSED_RECIPE = REPO / "recipes" / "gmp80_qat_distill_export.yaml"  # 80% GMP + QAT, the baseline teaches
UNDISTILLED_RECIPE = REPO / "recipes" / "gmp80_qat_export.yaml"  # the same without a teacher (compare_distillation)


def _fit(recipe: Path, root: Path, initial_weights: Path | None = None):
    """``sparselite fit`` with the demo's config; ``initial_weights``: the run starts from that model's weights."""
    if not CONFIG.is_file():
        raise SparseliteError(f"{CONFIG} not found; run the demo from a checkout of the sparselite repo")
    args = ["fit", "-c", str(CONFIG), "-c", str(recipe), "--trainer.default_root_dir", str(root)]
    if initial_weights is not None:
        args += ["--initial_weights", str(initial_weights)]
    return build_lightning_cli(args)


def _recipe_exporting_to(tflite: Path, copy: Path, source: Path = COMPRESSED_RECIPE, teacher: Path | None = None) -> Path:
    """``source`` (a recipe), written to ``copy`` with its TFLiteExport path set to ``tflite`` and its
    Distillation teacher (if it has one) set to ``teacher``: the recipe's own paths are relative to the
    working directory and name a `sparselite fit` run, and the demo keeps its files in --out."""
    recipe = yaml.safe_load(source.read_text())
    callbacks = recipe["trainer"]["callbacks"]
    exports = [cb for cb in callbacks if cb["class_path"].endswith("TFLiteExport")]
    if len(exports) != 1:
        raise SparseliteError(f"{source} should have exactly one TFLiteExport callback")
    exports[0].setdefault("init_args", {})["path"] = str(tflite)
    for distillation in (cb for cb in callbacks if cb["class_path"].endswith("Distillation")):
        if teacher is None:
            raise SparseliteError(f"{source} distils from a teacher: pass the demo's dense baseline as teacher")
        distillation.setdefault("init_args", {})["teacher"] = str(_teacher_file(teacher))
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return copy


def _baseline_fingerprint() -> str:
    """What the cached baseline depends on: the config, the dense recipe and the model's code."""
    from sparselite.models import classifier, mobilenet

    sources = [CONFIG, DENSE_RECIPE, Path(mobilenet.__file__), Path(classifier.__file__)]
    return hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()


def _teacher_file(path: Path) -> Path:
    """The cached baseline as a Distillation teacher: its weights go into a float copy of the student. Under
    `sparselite fit` a checkpoint with a config.yaml up to three folders above it would be rebuilt from that
    config instead; the demo's own folders hold none, so one there is not the demo's."""
    from sparselite.lightning_cli import find_run_config

    found = find_run_config(path)
    if found is not None:
        raise SparseliteError(f"{found} would be read as the config of the demo's teacher {path}; run the demo "
                              "with another --out")
    return path


def _cached_baseline(path: Path, retrain: bool) -> torch.nn.Module:
    fingerprint = _baseline_fingerprint()
    cached = None
    if path.is_file() and not retrain:
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)  # a file in a folder users share
        except Exception:  # noqa: BLE001 - an unreadable cache is only a cache: train again
            cached = {}
    if isinstance(cached, dict) and cached.get("fingerprint") == fingerprint:
        print("[demo] 1/4 dense fp32 baseline (cached)")
        cli = build_lightning_cli(["-c", str(CONFIG), "-c", str(DENSE_RECIPE)], run=False)
        cli.model.load_state_dict(cached["state_dict"])
        return cli.model
    stale = " (the cached one is from another config or model, or unreadable: retraining)" if cached is not None else ""
    print("[demo] 1/4 dense fp32 baseline" + stale)
    model = _fit(DENSE_RECIPE, path.parent).model
    torch.save({"fingerprint": fingerprint, "state_dict": model.state_dict()}, path)
    return model


def run_demo(out_dir: Path = Path("runs/demo"), retrain_baseline: bool = False, channels: bool = False,
             compare_distillation: bool = False) -> dict:
    """``channels``: also the 50%-channels recipe (distilled too); ``compare_distillation``: also the 80% GMP +
    QAT recipe without the teacher, and its int8 file's row."""
    started = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = load_split("test")
    test_loader = DataLoader(TensorDataset(images, labels), batch_size=500)

    # 1. Dense fp32 baseline (cached).
    teacher = out_dir / "dense" / "baseline_state.pt"
    baseline = _cached_baseline(teacher, retrain_baseline)
    example = baseline.example_input_array
    fp32_path = out_dir / "fp32.tflite"
    export_float_tflite(baseline, example, fp32_path)

    # 2. The baseline compressed: it is the starting point (as when you compress a model you trained) and the
    # teacher of 80% GMP + QAT, exported by the recipe's TFLiteExport callback.
    print("[demo] 2/4 80% gradual pruning + QAT + int8 export of the dense baseline, distilled from it")
    int8_path = out_dir / "int8.tflite"
    root = out_dir / "gmp80_qat_distill"
    cli = _fit(_recipe_exporting_to(int8_path, root / "recipe.yaml", teacher=teacher), root, initial_weights=teacher)
    compressed = cli.model
    exporter = next(cb for cb in cli.trainer.callbacks if isinstance(cb, TFLiteExport))
    report = exporter.report
    distillation = _distillation_settings(cli)

    # 3. Accuracy and parity over the whole test set.
    print("[demo] 3/4 accuracy and parity on the 10k test images")
    fake_quant_model, _ = fake_quant_reference(compressed)
    accuracy = {"fp32_dense_torch": top1_accuracy(baseline, images, labels),
                "fp32_dense_tflite_xnnpack": LiteRTModel(fp32_path).evaluate(test_loader)["accuracy"],
                "fake_quant_torch": top1_accuracy(fake_quant_model, images, labels),
                "int8_sparse_tflite_xnnpack": LiteRTModel(int8_path).evaluate(test_loader)["accuracy"]}
    parity = verify(compressed, int8_path, [images[i : i + 500] for i in range(0, len(images), 500)], report.parity.output_scale)

    if compare_distillation:  # the same recipe without the teacher: one more training run
        print("[demo] +  80% gradual pruning + QAT + int8 export, without distillation")
        undistilled_path = out_dir / "int8_no_distillation.tflite"
        root = out_dir / "gmp80_qat"
        _fit(_recipe_exporting_to(undistilled_path, root / "recipe.yaml", UNDISTILLED_RECIPE), root, initial_weights=teacher)
        accuracy["int8_sparse_no_distillation_tflite_xnnpack"] = LiteRTModel(undistilled_path).evaluate(test_loader)["accuracy"]

    channel_run = None
    if channels:  # --channels: one more recipe, and its file timed in the same interleaved run
        channel_run = _fit_channels(out_dir, test_loader, teacher)

    # 4. Latency, both files timed in one run, interleaved.
    print("[demo] 4/4 latency on XNNPACK, 1 thread")
    files = {"fp32": str(fp32_path), "int8": str(int8_path)}
    if channel_run:
        files["int8_channels"] = channel_run["path"]
    latency = interleaved_benchmark(files, threads=1)

    summary = _summary(fp32_path, int8_path, report, latency, parity, distillation, started, accuracy)
    if channel_run:
        summary["channels"] = channel_run
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_table(summary))
    return summary


def _summary(fp32_path: Path, int8_path: Path, report, latency: dict, parity, distillation: dict, started: float,
             accuracy: dict) -> dict:
    """The demo's measurements as one JSON-ready dict (summary.json)."""
    fp32_bytes, int8_bytes = fp32_path.stat().st_size, int8_path.stat().st_size
    return {
        "accuracy": accuracy,
        "distillation": distillation,
        "parity_test_set": vars(parity),
        "sparsity_in_file": {l.layer: l.sparsity_in_file for l in report.layers},
        "sparsity_in_training": {l.layer: l.sparsity_in_training for l in report.layers},
        "overall_sparsity_in_file": report.overall_sparsity_in_file,
        "bytes": {"fp32_tflite": fp32_bytes, "int8_dense_tflite": report.dense_int8_bytes, "int8_sparse_tflite": int8_bytes,
                  "fp32_tflite_xz": len(lzma.compress(fp32_path.read_bytes(), preset=9)), "int8_sparse_tflite_xz": report.xz_bytes, "int8_dense_tflite_xz": report.dense_int8_xz_bytes},
        "latency_ms": {name: r.to_dict() for name, r in latency.items()},
        "int8_vs_fp32_latency": latency["int8"].median_ms / latency["fp32"].median_ms,
        "wall_seconds": time.time() - started,
    }


def format_table(s: dict) -> str:
    a, b, lat = s["accuracy"], s["bytes"], s["latency_ms"]
    p = s["parity_test_set"]
    rows = [
        "sparselite demo: MobileNetLite on Fashion-MNIST (10k test images)",
        "-" * 72,
        f"{'accuracy':<44}{'top-1':>12}",
        f"{'  fp32 dense (torch)':<44}{a['fp32_dense_torch']:>12.2%}",
        f"{'  fp32 dense (.tflite, XNNPACK)':<44}{a['fp32_dense_tflite_xnnpack']:>12.2%}",
        f"{'  80% sparse, distilled: fake-quant (torch)':<44}{a['fake_quant_torch']:>12.2%}",
        f"{'  80% sparse, distilled: int8 (.tflite)':<44}{a['int8_sparse_tflite_xnnpack']:>12.2%}",
        *([f"{'  80% sparse, no teacher: int8 (.tflite)':<44}{a['int8_sparse_no_distillation_tflite_xnnpack']:>12.2%}"]
          if "int8_sparse_no_distillation_tflite_xnnpack" in a else []),
        f"{'  int8 file vs fake-quant: top-1 agreement':<44}{p['top1_agreement']:>12.2%}",
        f"{'  int8 file vs fake-quant: max |logit diff|':<44}{p['max_logit_diff_lsb']:>8.1f} LSB",
        "-" * 72,
        f"{'sparsity read from the .tflite':<44}{'file':>12}{'training':>12}",
    ]
    for layer, value in s["sparsity_in_file"].items():
        rows.append(f"  {layer:<42}{value:>12.2%}{s['sparsity_in_training'][layer]:>12.2%}")
    rows.append(f"{'  overall (pruned layers)':<44}{s['overall_sparsity_in_file']:>12.2%}")
    rows += [
        "-" * 72,
        f"{'file size':<44}{'bytes':>12}{'xz -9':>12}",
        f"{'  fp32 .tflite':<44}{b['fp32_tflite']:>12,}{b['fp32_tflite_xz']:>12,}",
        f"{'  int8 .tflite, dense storage':<44}{b['int8_dense_tflite']:>12,}{b['int8_dense_tflite_xz']:>12,}",
        f"{'  int8 .tflite, sparse storage':<44}{b['int8_sparse_tflite']:>12,}{b['int8_sparse_tflite_xz']:>12,}",
        "-" * 72,
        f"{'latency, XNNPACK, 1 thread, batch 1':<44}{'median ms':>12}{'p90 ms':>12}",
        f"{'  fp32':<44}{lat['fp32']['median_ms']:>12.3f}{lat['fp32']['p90_ms']:>12.3f}",
        f"{'  int8 (sparse file)':<44}{lat['int8']['median_ms']:>12.3f}{lat['int8']['p90_ms']:>12.3f}",
        f"{'  int8 / fp32':<44}{s['int8_vs_fp32_latency']:>11.2f}x",
        "-" * 72,
        "On x86, XNNPACK densifies sparse weights at load and runs dense int8 kernels: the int8 speed-up",
        "comes from quantization; sparsity buys file size here, not CPU latency.",
        *_distillation_note(s),
        f"demo wall time: {s['wall_seconds'] / 60:.1f} min",
    ]
    if "channels" in s:
        rows[-1:-1] = _channel_rows(s)
    return "\n".join(rows)


def _distillation_settings(cli) -> dict[str, Any] | None:
    from sparselite.distillation.callback import Distillation

    found = next((cb for cb in cli.trainer.callbacks if isinstance(cb, Distillation)), None)
    if found is None:
        return None
    return {"teacher": found.source, "temperature": found.temperature, "weight": found.weight,
            "begin_step": found.begin_step, "end_step": found.end_step}


def _distillation_note(s: dict[str, Any]) -> list[str]:
    d = s.get("distillation")
    if not d:
        return []
    note = [f"distilled: the fp32 dense model was its teacher (T={d['temperature']:g}, weight {d['weight']:g})."]
    if "int8_sparse_no_distillation_tflite_xnnpack" not in s["accuracy"]:
        note.append("With and without the teacher, on every recipe: benchmarks/distillation.py.")
    return note


# ``sparselite demo --channels``: the channel-pruned int8 file next to the dense and sparse ones. It trains
# recipes/channels50_qat_distill_export.yaml (50% of channels removed, then QAT, then int8 export, the dense
# baseline as teacher) with the demo's config; the default demo runs none of this.
CHANNEL_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "channels50_qat_distill_export.yaml"


def _fit_channels(out_dir: Path, test_loader: DataLoader, teacher: Path | None = None) -> dict[str, Any]:
    """Train and export the channel recipe into ``out_dir`` (``teacher``: the recipe's Distillation teacher);
    returns its accuracy, bytes and report numbers."""
    from sparselite.export.callback import TFLiteExport

    print("[demo] +  50% channel pruning + QAT + int8 export (--channels)")
    path = out_dir / "channels50_int8.tflite"
    root = out_dir / "channels50_qat"
    cli = _fit(_recipe_exporting_to(path, root / "recipe.yaml", CHANNEL_RECIPE, teacher), root, initial_weights=teacher)
    report = next(cb for cb in cli.trainer.callbacks if isinstance(cb, TFLiteExport)).report
    return {"path": str(path), "bytes": path.stat().st_size, "distilled": _distillation_settings(cli) is not None, "accuracy": LiteRTModel(path).evaluate(test_loader)["accuracy"],
            "parity_top1_agreement": report.parity.top1_agreement if report.parity else None, "channel_report": report.channels}


def _channel_rows(s: dict[str, Any]) -> list[str]:
    c, lat = s["channels"], s["latency_ms"]
    return [
        "-" * 72,
        "channel pruning (--channels): 50% of channels removed, then QAT, int8 (.tflite, XNNPACK)"
        + (", distilled" if c.get("distilled") else ""),
        f"{'  top-1 accuracy':<44}{c['accuracy']:>12.2%}",
        f"{'  file bytes (vs int8 dense storage)':<44}{c['bytes']:>12,}{c['bytes'] / s['bytes']['int8_dense_tflite']:>11.2f}x",
        f"{'  latency median ms (vs int8 sparse file)':<44}{lat['int8_channels']['median_ms']:>12.3f}"
        f"{lat['int8_channels']['median_ms'] / lat['int8']['median_ms']:>11.2f}x",
        "  fewer channels is a smaller dense model: faster on every runtime, unlike sparsity on x86.",
    ]
