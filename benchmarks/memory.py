"""Peak resident memory (RSS) of exporting the demo model to int8 TFLite, one subprocess per measurement.

What it measures: ``resource.getrusage(...).ru_maxrss`` of a fresh Python process that does one thing
(the maximum of RUSAGE_SELF and RUSAGE_CHILDREN, so helpers that export may spawn are counted):
  - ``import``:        import torch, lightning, sparselite, litert_torch and the LiteRT interpreter (the floor);
  - ``export sparse``: MobileNetLite pruned to 80% (one-shot, ``MagnitudePruner``), QAT ranges observed
                       on real batches (``QuantizationSimulator``), then ``export_tflite(sparse=True)``
                       with verification on 512 held-out images;
  - ``export dense``:  the same model, ``export_tflite(sparse=False)``;
  - ``export PTQ``:    an unpruned float MobileNetLite, no QAT, ranges calibrated on 512 images;
  - ``fit + export``:  (``--fit-steps N``, default 20) a Lightning ``Trainer.fit`` of ``ImageClassifier``
                       on the full Fashion-MNIST datamodule with ``GradualPruning``, ``QuantizationAwareTraining``
                       and ``TFLiteExport`` (the demo recipe scaled down to N steps): the demo's pipeline in one process.
Target: every peak <= 4 GB (4096 MiB).

The whole demo: ``--demo`` runs ``sparselite demo --out <tmp>`` (when the installed package has it) as the
only child of a fresh subprocess and reports RUSAGE_CHILDREN's peak there (once, whatever ``--repeats``). By hand, GNU time gives the same number ("Maximum resident set size"):
    /usr/bin/time -v .venv/bin/sparselite demo --out /tmp/demo 2>&1 | grep -E 'Maximum resident|Elapsed'
Peaks do not add up across processes: a demo that trains in one process and exports in another has
the larger of the two as its peak.

Run (from the repo root):
    .venv/bin/python -m benchmarks.memory                       # ~2 min on 2 busy cores
    .venv/bin/python -m benchmarks.memory --repeats 3 --fit-steps 50 --json out.json
    .venv/bin/python -m benchmarks.memory --only import --demo    # the whole demo: trains 2 x 1200 steps (long)
    .venv/bin/python -m benchmarks.memory --only "import,export sparse" --torchvision resnet50   # the zoo's largest export
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_MIB = 4096
MEASUREMENTS = ("import", "export sparse", "export dense", "export PTQ", "fit + export")


def peak_rss_mib() -> float:
    """Peak RSS of this process and of its waited-for children, in MiB (Linux reports KiB)."""
    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(self_kib, children_kib) / 1024


def _imports() -> None:
    import sparselite  # noqa: F401  (first: with torchvision installed, see sparselite/compat/torchvision.py)
    import lightning  # noqa: F401
    import litert_torch  # noqa: F401
    import torch  # noqa: F401
    from ai_edge_litert.interpreter import Interpreter  # noqa: F401


def _compressed_model(prune: bool, qat: bool, torchvision: str | None = None):
    import torch

    from benchmarks import _common as C
    from sparselite.models.mobilenet import MobileNetLite
    from sparselite.pruning.pruner import MagnitudePruner
    from sparselite.pruning.schedule import PolynomialDecay
    from sparselite.quantization.qat import QuantizationSimulator

    torch.manual_seed(0)
    data = C.load_data()
    if torchvision:  # the zoo's setting: 64x64 RGB, 10 classes, no pretrained weights
        import torchvision.models as tvm

        from sparselite.data.fashion_mnist import resize_images

        model = getattr(tvm, torchvision)(weights=None, num_classes=10)
        data = C.Data(*(resize_images(v[:1024], 64, 3) if k.endswith("_x") else v[:1024] for k, v in vars(data).items()))
    else:
        model = MobileNetLite()
    if prune:
        pruner = MagnitudePruner(PolynomialDecay(final_sparsity=0.8, begin_step=0, end_step=1, frequency=1))
        pruner.prepare(model)
        pruner.step(1)  # one-shot to 80%: memory does not depend on how the zeros got there
    if qat:
        simulator = QuantizationSimulator(begin_step=0)
        simulator.prepare(model, (data.train_x[:1],))  # the example finds functional ops' sites (residual adds)
        model.train()
        with torch.no_grad():  # observe activation ranges on real batches
            for batch in data.train_x[:1024].split(128):
                model(batch)
        simulator.step(1)
    return model, data


def child(what: str, fit_steps: int, torchvision: str | None = None) -> dict:
    """Runs in the subprocess: do ``what`` once, return timings and the peak RSS."""
    start = time.perf_counter()
    _imports()
    info: dict = {"import_seconds": time.perf_counter() - start}
    if what == "import":
        pass
    elif what.startswith("export"):
        import torch

        from sparselite import export_tflite

        model, data = _compressed_model(prune=what != "export PTQ", qat=what != "export PTQ", torchvision=torchvision)
        held_out = list(data.val_x[:512].split(128))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            report = export_tflite(model, held_out[0][:1], Path(tmp) / "model.tflite",
                                   sparse=what != "export dense", verify_data=held_out, min_agreement=0.0,
                                   calibration_data=held_out if what == "export PTQ" else None)
            info["export_seconds"] = time.perf_counter() - t0
        info["file_bytes"] = report.file_bytes
    elif what == "fit + export":
        import lightning.pytorch as pl

        from sparselite import GradualPruning, QuantizationAwareTraining, TFLiteExport
        from sparselite.data.fashion_mnist import FashionMNISTDataModule
        from sparselite.models.classifier import ImageClassifier
        from sparselite.models.mobilenet import MobileNetLite

        pl.seed_everything(0, verbose=False)
        steps = max(fit_steps, 4)
        with tempfile.TemporaryDirectory() as tmp:
            export = TFLiteExport(str(Path(tmp) / "model.tflite"), verify_batches=4, calibration_batches=0, min_agreement=0.0)
            callbacks = [GradualPruning(final_sparsity=0.8, begin_step=0, end_step=steps // 2, frequency=max(1, steps // 10)),
                         QuantizationAwareTraining(begin_step=steps // 2 + 1, freeze_step=steps - 1), export]
            trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, callbacks=callbacks, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                 limit_val_batches=4, val_check_interval=steps, num_sanity_val_steps=0, default_root_dir=tmp)
            t0 = time.perf_counter()
            trainer.fit(ImageClassifier(MobileNetLite(), lr=5e-3), datamodule=FashionMNISTDataModule(batch_size=128))
            info["fit_export_seconds"] = time.perf_counter() - t0
            info["file_bytes"] = export.report.file_bytes
        info["steps"] = steps
    else:
        raise SystemExit(f"unknown measurement {what!r}")
    info["peak_rss_mib"] = peak_rss_mib()
    return info


def measure(what: str, fit_steps: int, torchvision: str | None = None) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    model = ["--torchvision", torchvision] if torchvision else []
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", what, "--fit-steps", str(fit_steps), *model],
                          capture_output=True, text=True, env=env, check=False, cwd=Path(__file__).resolve().parents[1])
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}", "wall_seconds": wall}
    return {**json.loads(lines[-1]), "wall_seconds": wall}


def demo_child() -> dict:
    """Runs in a fresh subprocess: ``sparselite demo`` as its only child, so RUSAGE_CHILDREN's ru_maxrss
    is the demo's peak (the largest process the demo ran, its own subprocesses included)."""
    exe = Path(sys.executable).with_name("sparselite")
    if not exe.exists():
        return {"error": f"{exe} not found"}
    probe = subprocess.run([sys.executable, "-c", "import sparselite.demo"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return {"error": "this sparselite has no demo module yet (import sparselite.demo failed)"}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.run([str(exe), "demo", "--out", tmp], capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
    result = {"demo_seconds": wall, "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
              "exit_code": proc.returncode}
    if proc.returncode != 0:
        result["error"] = f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help="subprocesses per measurement; the median is reported")
    parser.add_argument("--fit-steps", type=int, default=20, help="training steps in the 'fit + export' measurement")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(MEASUREMENTS)}")
    parser.add_argument("--demo", action="store_true", help="also run `sparselite demo` and report its peak (long)")
    parser.add_argument("--torchvision", metavar="NAME",
                        help="the export measurements use this torchvision model (64x64 RGB, as in the zoo) instead of MobileNetLite")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(demo_child() if args.child == "sparselite demo" else child(args.child, args.fit_steps, args.torchvision)))
        return

    import statistics

    from benchmarks import _common as C

    env = C.environment()
    chosen = [m.strip() for m in args.only.split(",")] if args.only else list(MEASUREMENTS)
    if args.demo:
        chosen.append("sparselite demo")
    results = {}
    for what in chosen:
        runs = []
        for _ in range(1 if what == "sparselite demo" else args.repeats):
            runs.append(measure(what, args.fit_steps, args.torchvision))
            print(f"  {what}: {runs[-1]}", file=sys.stderr, flush=True)
        good = [r for r in runs if "error" not in r]
        results[what] = {"runs": runs, "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in good) if good else None,
                         "error": None if good else runs[-1]["error"]}
    print()
    print(C.environment_line(env))
    print(f"Peak RSS (ru_maxrss) per fresh subprocess; median of {args.repeats} run(s); target <= {TARGET_MIB} MiB\n")
    rows = []
    floor = results.get("import", {}).get("peak_rss_mib")
    for what, r in results.items():
        peak = r.get("peak_rss_mib")
        runs = r.get("runs") or [r]
        extra = []
        for key, label in (("export_seconds", "export"), ("fit_export_seconds", "fit+export"), ("demo_seconds", "demo"),
                           ("wall_seconds", "process")):
            values = [x[key] for x in runs if key in x]
            if values:
                extra.append(f"{label} {statistics.median(values):.0f} s")
        sizes = [x["file_bytes"] for x in runs if "file_bytes" in x]
        rows.append([what, C.fmt(peak, ".0f"), "-" if peak is None or floor is None or what == "import" else f"{peak - floor:+.0f}",
                     "-" if peak is None else ("yes" if peak <= TARGET_MIB else "NO"),
                     f"{sizes[0]:,}" if sizes else "-", ", ".join(extra), r.get("error") or ""])
    print(C.table(["measurement", "peak RSS MiB", "over import", f"<= {TARGET_MIB}", "file bytes", "time", "error"], rows))
    if "fit + export" in results:
        print(f"\n'fit + export' = Trainer.fit of {max(args.fit_steps, 4)} steps on the full Fashion-MNIST datamodule with "
              "GradualPruning + QuantizationAwareTraining + TFLiteExport in one process.")
    if not args.demo:
        gnu_time = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
        how = f"{gnu_time} -v .venv/bin/sparselite demo" if gnu_time else ".venv/bin/python -m benchmarks.memory --demo"
        print(f"Whole demo: `{how}` ('Maximum resident set size'), or rerun this script with --demo.")
    C.write_json(args.json, {"environment": env, "args": vars(args), "target_mib": TARGET_MIB, "results": results})


if __name__ == "__main__":
    main()
