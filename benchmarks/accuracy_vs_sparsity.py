"""Accuracy against sparsity on the demo model, and the sensitivity recipe against uniform GMP.

What it measures, on Fashion-MNIST with configs/fmnist_mobilenet.yaml, every run through the real CLI
(`sparselite fit` with a GMP + QAT + export recipe scaled to ``--steps`` as recipes/gmp80_qat_export.yaml
is to 1200 steps: pruning over 8%..58% of the steps, QAT from 67%, ranges frozen at 92%):
  1. the curve: for each pattern (``--patterns``: unstructured, 1x4) and sparsity (``--sparsities``:
     0/50/70/80/90/95%), the int8 file's top-1 on the runtime (`sparselite eval`, XNNPACK, the test split);
  2. the comparison: for each overall sparsity of ``--compare`` (80%, 90%), `sparselite sensitivity` on a
     dense model (``--pretrain-steps``, default the same budget) writes per-layer targets; its recipe is
     trained with the same steps as uniform GMP, and both int8 files are scored the same way.
Target (issue 25): the sensitivity recipe's file is at least as accurate as uniform GMP at 80% and 90%.

Run (from the repo root):
    .venv/bin/python -m benchmarks.accuracy_vs_sparsity --reduced     # minutes: 60 steps, 2k images, 1k test images
    .venv/bin/python -m benchmarks.accuracy_vs_sparsity --json benchmarks/results/accuracy_vs_sparsity_steps1200.json \
        --plot benchmarks/results/accuracy_vs_sparsity_steps1200.png     # hours on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks._common import CONFIG, REPO, environment, environment_line, fmt, table, write_json

REDUCED = {"steps": 60, "train_subset": 2048, "sparsities": "0,0.8,0.9", "patterns": "unstructured", "compare": "0.8",
           "eval_limit": 1000, "val_batches": 4, "grid": "0.5,0.8,0.95"}


def recipe(root: Path, steps: int, sparsity: float, pattern: str, overrides: dict | None = None) -> dict:
    """recipes/gmp80_qat_export.yaml scaled to ``steps`` (its schedule is written for 1200)."""
    def at(step: int) -> int:
        return max(1, round(step * steps / 1200))

    callbacks = []
    if sparsity > 0:
        args = {"final_sparsity": sparsity, "begin_step": at(100), "end_step": at(700), "frequency": at(50), "pattern": pattern}
        if overrides:
            args["overrides"] = overrides
        callbacks.append({"class_path": "sparselite.GradualPruning", "init_args": args})
    callbacks += [{"class_path": "sparselite.QuantizationAwareTraining", "init_args": {"begin_step": at(800), "freeze_step": at(1100)}},
                  {"class_path": "sparselite.TFLiteExport", "init_args": {"path": str(root / "model.tflite")}}]
    return {"trainer": {"default_root_dir": str(root), "callbacks": callbacks}}


def cli(*args: str, timeout: int = 6 * 3600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run([sys.executable, "-m", "sparselite.cli", *args], capture_output=True, text=True, cwd=REPO,
                            env=env, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"sparselite {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def common_args(ns: argparse.Namespace) -> list[str]:
    # Validation once, at the end, counted in steps (a train subset can hold fewer batches than the run has steps).
    args = ["--trainer.max_steps", str(ns.steps), "--trainer.val_check_interval", str(ns.steps),
            "--trainer.check_val_every_n_epoch", "null", "--trainer.limit_val_batches", str(ns.val_batches)]
    if ns.train_subset:
        args += ["--data.init_args.train_subset", str(ns.train_subset)]
    return args


def data_config(ns: argparse.Namespace, out: Path) -> Path:
    """A config that only sets what the CLI flags would (sensitivity takes configs, not flags)."""
    path = out / "bench_overrides.yaml"
    data = {"trainer": {"max_steps": ns.steps, "val_check_interval": ns.steps, "check_val_every_n_epoch": None}}
    if ns.train_subset:
        data["data"] = {"init_args": {"train_subset": ns.train_subset}}
    path.write_text(yaml.safe_dump(data))
    return path


def train_and_score(ns: argparse.Namespace, name: str, recipe_data: dict, out: Path) -> dict:
    root = Path(recipe_data["trainer"]["default_root_dir"])
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe_data, sort_keys=False))
    started = time.perf_counter()
    cli("fit", "-c", str(CONFIG), "-c", str(path), *common_args(ns))
    scored = json.loads(cli("eval", str(root / "model.tflite"), "--json", *(["--limit", str(ns.eval_limit)] if ns.eval_limit else []))
                        .stdout.strip().splitlines()[-1])
    report = json.loads((root / "model.json").read_text())
    result = {"name": name, "top1": scored["accuracy"], "examples": scored["examples"],
              "sparsity_in_file": report.get("overall_sparsity_in_file"), "file_bytes": report["file_bytes"],
              "seconds": time.perf_counter() - started}
    print(f"  {name}: top-1 {result['top1']:.2%} over {result['examples']}, sparsity in file "
          f"{fmt(result['sparsity_in_file'], '.1%')}, {result['seconds']:.0f} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduced", action="store_true", help=f"a few minutes' setting: {REDUCED}")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--sparsities", default="0,0.5,0.7,0.8,0.9,0.95")
    parser.add_argument("--patterns", default="unstructured,1x4")
    parser.add_argument("--compare", default="0.8,0.9", help="overall sparsities for sensitivity vs uniform GMP ('' skips)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="dense steps sensitivity measures on (default --steps)")
    parser.add_argument("--grid", default="0.3,0.5,0.7,0.8,0.9,0.95", help="sensitivity's grid")
    parser.add_argument("--fine-tune-steps", type=int, default=0)
    parser.add_argument("--val-batches", type=int, default=8, help="validation batches (sensitivity points, fit's check)")
    parser.add_argument("--eval-limit", type=int, default=0, help="test images to score each file on (0: all 10k)")
    parser.add_argument("--out", default="runs/bench_accuracy_vs_sparsity")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None, help="the accuracy-vs-sparsity curve (PNG)")
    ns = parser.parse_args(argv)
    if ns.reduced:
        for key, value in REDUCED.items():
            setattr(ns, key, value)
    out = (REPO / ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(environment_line(env))
    print(f"# {ns.steps} steps, train subset {ns.train_subset or 'all'}, eval on {ns.eval_limit or 'all'} test images", flush=True)

    curve = []
    for pattern in [p for p in ns.patterns.split(",") if p]:
        for sparsity in [float(s) for s in ns.sparsities.split(",") if s]:
            if sparsity == 0 and any(r["sparsity"] == 0 for r in curve):
                continue  # dense int8 is the same run for every pattern
            name = f"{'dense' if sparsity == 0 else pattern}_{round(100 * sparsity)}"
            result = train_and_score(ns, name, recipe(out / name, ns.steps, sparsity, pattern), out)
            curve.append({**result, "pattern": "-" if sparsity == 0 else pattern, "sparsity": sparsity})

    comparison = []
    for target in [float(s) for s in ns.compare.split(",") if s]:
        name = f"sensitivity_{round(100 * target)}"
        base = out / f"{name}_input.yaml"
        base.write_text(yaml.safe_dump(recipe(out / name, ns.steps, target, "unstructured"), sort_keys=False))
        sweep = out / f"{name}_sweep"
        started = time.perf_counter()
        cli("sensitivity", "-c", str(CONFIG), "-c", str(data_config(ns, out)), "-c", str(base), "--target", str(target),
            "--grid", ns.grid, "--pretrain-steps", str(ns.pretrain_steps or ns.steps), "--fine-tune-steps", str(ns.fine_tune_steps),
            "--val-batches", str(ns.val_batches), "-o", str(sweep))
        sweep_s = time.perf_counter() - started
        print(f"  sensitivity sweep for {target:.0%}: {sweep_s:.0f} s ({sweep / 'sensitivity.png'})", flush=True)
        written = yaml.safe_load((sweep / "recipe.yaml").read_text())
        overrides = written["trainer"]["callbacks"][0]["init_args"]["overrides"]
        sensitive = train_and_score(ns, name, recipe(out / name, ns.steps, target, "unstructured", overrides), out)
        uniform = next((r for r in curve if r["pattern"] == "unstructured" and abs(r["sparsity"] - target) < 1e-9), None)
        if uniform is None:
            uniform = train_and_score(ns, f"unstructured_{round(100 * target)}", recipe(out / f"unstructured_{round(100 * target)}",
                                                                                       ns.steps, target, "unstructured"), out)
        comparison.append({"target": target, "uniform": uniform, "sensitivity": sensitive, "sweep_seconds": sweep_s,
                           "overrides": overrides, "at_least_as_accurate": sensitive["top1"] >= uniform["top1"]})

    print("\nint8 file top-1 on XNNPACK against sparsity (GMP + QAT, same steps)")
    print(table(["pattern", "sparsity", "in file", "top-1", "file B"],
                [[r["pattern"], f"{r['sparsity']:.0%}", fmt(r["sparsity_in_file"], ".1%"), f"{r['top1']:.2%}", f"{r['file_bytes']:,}"]
                 for r in curve], left=(0,)))
    if comparison:
        print("\nsensitivity recipe against uniform GMP (unstructured, same steps)")
        print(table(["overall", "uniform top-1", "sensitivity top-1", "difference", "target met"],
                    [[f"{c['target']:.0%}", f"{c['uniform']['top1']:.2%}", f"{c['sensitivity']['top1']:.2%}",
                      f"{100 * (c['sensitivity']['top1'] - c['uniform']['top1']):+.2f} pt", fmt(c["at_least_as_accurate"])]
                     for c in comparison]))
    if ns.plot:
        plot(curve, comparison, ns.plot)
    write_json(ns.json, {"environment": env, "settings": vars(ns), "curve": curve, "comparison": comparison})


def plot(curve: list[dict], comparison: list[dict], path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    dense = [r for r in curve if r["sparsity"] == 0]
    for pattern in sorted({r["pattern"] for r in curve} - {"-"}):
        points = sorted(dense + [r for r in curve if r["pattern"] == pattern], key=lambda r: r["sparsity"])
        ax.plot([100 * r["sparsity"] for r in points], [100 * r["top1"] for r in points], marker="o", label=f"GMP, {pattern}")
    for c in comparison:
        ax.plot([100 * c["target"]], [100 * c["sensitivity"]["top1"]], marker="*", ms=12, color="black", ls="none",
                label="sensitivity recipe" if c is comparison[0] else None)
    ax.set_xlabel("sparsity of the pruned layers, %")
    ax.set_ylabel("int8 file top-1 on XNNPACK, %")
    ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
