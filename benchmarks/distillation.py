"""Distillation on the demo MobileNetLite: int8 file accuracy with and without the dense teacher, and the
step-time overhead of running the teacher.

Every model is trained the way a user trains it: ``sparselite fit -c configs/fmnist_mobilenet.yaml -c <recipe>``
(``build_lightning_cli``: the config's datamodule, seed, optimizer and validation, the recipes' callbacks and
schedules, the recipe's ``TFLiteExport``).
  1. The teacher and the accuracy reference: the dense fp32 baseline, ``recipes/dense.yaml``, trained once and
     cached in ``<out>/dense`` (reused while the config, the dense recipe, the model code, ``--teacher-steps`` and the
     torch thread count are unchanged; ``--retrain-teacher`` to force). Its top-1 (torch) on the test images is
     the "dense fp32" of the targets.
  2. Rows: 80% unstructured (recipes/gmp80_qat_export.yaml), 90% unstructured (the same with final_sparsity 0.9),
     50% channels (channels50_qat_export.yaml), 50% channels + 80% unstructured (channels50_gmp80_qat_export.yaml).
     Each is trained twice from the same initialization (the config's ``seed_everything``; the initial weights'
     fingerprint is recorded and compared): the recipe as it is, and the recipe plus the ``Distillation`` entry
     of recipes/gmp80_qat_distill_export.yaml (T=2, weight=0.5 unless ``--temperature`` / ``--weight``), its
     teacher the cached checkpoint, rebuilt from that run's config.yaml as ``sparselite fit`` does.
  3. The recipe's ``TFLiteExport`` writes the int8 file; its top-1 on the test images (LiteRTModel, XNNPACK)
     against the dense fp32 model.
  4. Step time: (a) in the real runs, the median training step (Lightning's batch start to batch end, which
     holds the optimizer step and the callbacks) with / without distillation, per row; (b) a controlled
     measure: one step of the 80%-sparse + QAT student with and without the teacher (``Distiller``: capture,
     teacher forward under no_grad, loss), interleaved step by step, batch 128, the median over turns of
     (with / without) in the same turn.
Each run's result is kept in ``<out>/runs/<row>_<with|without>[_options]/result.json`` and reused by a later
invocation with the same teacher and steps, so a row can be re-run with other distillation options
(``--rows 1 --temperature 2``) without retraining its "without" model.

Targets (issue 24): 80% sparse int8 >= dense fp32 - 0.3 point; 50% channels >= -0.3; 50% channels + 80% >= -0.6;
never worse than without distillation; step with the teacher <= 1.35x.

Run (from the repo root):
    .venv/bin/python -m benchmarks.distillation --quick --out runs/bench_distillation_quick   # smoke run
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python -m benchmarks.distillation \\
        --json benchmarks/results/distillation_steps1200.json --txt benchmarks/results/distillation_steps1200.txt
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import _common as C  # imports sparselite, whose torchvision guard must come before lightning

import lightning.pytorch as pl  # noqa: E402  (after sparselite: see above)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "fmnist_mobilenet.yaml"
DENSE_RECIPE = REPO / "recipes" / "dense.yaml"
DISTILL_RECIPE = REPO / "recipes" / "gmp80_qat_distill_export.yaml"  # where the Distillation entry comes from
TARGETS = {"80% unstructured": -0.3, "50% channels": -0.3, "50% channels + 80% unstructured": -0.6, "overhead": 1.35}
RECIPE_STEPS = 1200  # the recipes' schedules are written for configs/fmnist_mobilenet.yaml's 1200 steps
SCHEDULE_KEYS = ("begin_step", "end_step", "freeze_step", "frequency")
# recipes/dense.yaml's ModelCheckpoint (saved when max_steps ends the last epoch), so the students' runs keep
# their trained state too: Lightning's default saves after each validation only (step 800 of 1200 here).
FINAL_CHECKPOINT = [cb for cb in yaml.safe_load(DENSE_RECIPE.read_text())["trainer"]["callbacks"]
                    if cb["class_path"].endswith("ModelCheckpoint")]


@dataclass
class Row:
    name: str
    recipe: str  # recipes/<recipe>.yaml
    unstructured: float | None = None  # GradualPruning's final_sparsity, when it differs from the recipe's


ROWS = [Row("80% unstructured", "gmp80_qat_export"), Row("90% unstructured", "gmp80_qat_export", unstructured=0.9),
        Row("50% channels", "channels50_qat_export"),
        Row("50% channels + 80% unstructured", "channels50_gmp80_qat_export")]


class RunProbe(pl.Callback):
    """The initial weights' fingerprint (same initialization with and without the teacher) and each training
    step's wall time (batch start to batch end: forward, the teacher, backward, optimizer, callbacks)."""

    def __init__(self) -> None:
        self.initial_fingerprint: str | None = None
        self.step_seconds: list[float] = []
        self._started = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from sparselite.distillation.teacher import fingerprint

        self.initial_fingerprint = fingerprint(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_seconds.append(time.perf_counter() - self._started)


def _fingerprint_of_files(paths: list[Path], extra: str) -> str:
    digest = hashlib.sha256(extra.encode())
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _step_overrides(steps: int) -> list[str]:
    if steps == RECIPE_STEPS:
        return []  # the config as it is
    interval = min(400, steps)
    return ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(interval),
            "--trainer.limit_val_batches", "4"]


def _quietly():
    return contextlib.redirect_stdout(sys.stderr)  # Lightning's and the converter's lines stay off the table


def dense_teacher(out: Path, steps: int, retrain: bool, config: Path = CONFIG) -> tuple[Path, str]:
    """The cached dense baseline's checkpoint (trained with recipes/dense.yaml if needed) and its cache key."""
    from sparselite.checkpoints import load_checkpoint
    from sparselite.lightning_cli import build_lightning_cli
    from sparselite.models import classifier, mobilenet

    key = _fingerprint_of_files([config, DENSE_RECIPE, Path(mobilenet.__file__), Path(classifier.__file__)],
                                f"steps={steps};threads={torch.get_num_threads()}")
    folder = out / "dense"
    record = folder / "teacher.json"
    if record.is_file() and not retrain:
        cached = json.loads(record.read_text())
        if cached.get("key") == key and Path(cached["checkpoint"]).is_file():
            print(f"[bench] dense fp32 teacher (cached): {cached['checkpoint']}", file=sys.stderr, flush=True)
            return Path(cached["checkpoint"]), key
    print(f"[bench] dense fp32 teacher: sparselite fit -c {config.name} -c recipes/dense.yaml ({steps} steps)",
          file=sys.stderr, flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    with _quietly():
        cli = build_lightning_cli(["fit", "-c", str(config), "-c", str(DENSE_RECIPE), "--trainer.default_root_dir",
                                   str(folder), *_step_overrides(steps)])
    checkpoint = Path(cli.trainer.checkpoint_callback.last_model_path)
    if load_checkpoint(checkpoint).get("global_step") != steps:
        raise SystemExit(f"{checkpoint} is not the trained model (step {load_checkpoint(checkpoint).get('global_step')})")
    record.write_text(json.dumps({"key": key, "checkpoint": str(checkpoint)}, indent=2))
    return checkpoint, key


def scaled_recipe(row: Row, steps: int, root: Path, distillation: dict | None) -> tuple[Path, dict]:
    """recipes/<row.recipe>.yaml with its schedules scaled to ``steps``, the run probe, and (``distillation``) the
    Distillation entry of the distilling recipe with these init_args; without its TFLiteExport, whose init_args
    are returned (the export runs from the checkpoint)."""
    recipe = yaml.safe_load((REPO / "recipes" / f"{row.recipe}.yaml").read_text())
    trainer = recipe["trainer"]
    trainer["default_root_dir"] = str(root)
    export_args = {}
    for callback in trainer["callbacks"]:
        name, args = callback["class_path"].rsplit(".", 1)[-1], callback.setdefault("init_args", {})
        for key in SCHEDULE_KEYS:
            if key in args and steps != RECIPE_STEPS:
                args[key] = max(1, int(round(args[key] * steps / RECIPE_STEPS)))
        if name == "GradualPruning" and row.unstructured is not None:
            args["final_sparsity"] = row.unstructured
        if name == "TFLiteExport":
            export_args = dict(args)
    trainer["callbacks"] = [cb for cb in trainer["callbacks"] if not cb["class_path"].endswith("TFLiteExport")]
    if distillation is not None:
        (entry,) = [cb for cb in yaml.safe_load(DISTILL_RECIPE.read_text())["trainer"]["callbacks"]
                    if cb["class_path"].endswith("Distillation")]
        entry["init_args"].update(distillation)
        trainer["callbacks"].append(entry)
    trainer["callbacks"] += [{"class_path": "benchmarks.distillation.RunProbe"}, *FINAL_CHECKPOINT]
    root.mkdir(parents=True, exist_ok=True)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path, export_args


def train_and_measure(row: Row, index: int, distillation: dict | None, args, teacher: Path, teacher_key: str,
                      test: DataLoader) -> dict:
    """Train (``sparselite fit``, the recipe without its TFLiteExport), then export the checkpoint as
    ``sparselite export`` does, with the recipe's TFLiteExport options. Both stages keep their results in the
    run's folder: a failed export is redone from the checkpoint without training again."""
    from sparselite.lightning_cli import build_lightning_cli

    key = "without" if distillation is None else "with"
    options = "" if not distillation or set(distillation) == {"teacher"} else "_" + "_".join(
        f"{k}{v:g}" for k, v in sorted(distillation.items()) if k != "teacher")
    from_dense = args.start == "dense"
    seeded = args.seed is not None
    root = Path(args.out) / "runs" / f"{index}_{key}{options}{'_from_dense' if from_dense else ''}{f'_seed{args.seed}' if seeded else ''}"
    saved, trained_record = root / "result.json", root / "trained.json"
    cache_key = json.loads(json.dumps({"teacher": teacher_key, "steps": args.steps, "row": row.name,
                                       "distillation": distillation, "test_limit": args.test_limit,
                                       **({"start": "dense"} if from_dense else {}),
                                       **({"seed": args.seed} if seeded else {})}))
    if saved.is_file() and not args.retrain:
        result = json.loads(saved.read_text())
        if result.get("cache_key") == cache_key:
            print(f"[bench] {row.name}, {key} distillation{options}: cached ({saved})", file=sys.stderr, flush=True)
            return result
    trained = json.loads(trained_record.read_text()) if trained_record.is_file() and not args.retrain else {}
    if trained.get("cache_key") != {k: v for k, v in cache_key.items() if k != "test_limit"}:
        print(f"[bench] {row.name}, {key} distillation{options}: training", file=sys.stderr, flush=True)
        recipe, export_args = scaled_recipe(row, args.steps, root, distillation)
        started = time.perf_counter()
        with _quietly():
            cli = build_lightning_cli(["fit", "-c", str(args.config), "-c", str(recipe), *_step_overrides(args.steps),
                                       *(["--initial_weights", str(teacher)] if from_dense else []),
                                       *(["--seed_everything", str(args.seed)] if seeded else [])])
        probe = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "RunProbe")
        checkpoint = cli.trainer.checkpoint_callback
        if cli.trainer.global_step != args.steps:
            raise SystemExit(f"the run stopped at step {cli.trainer.global_step} of {args.steps}")
        steps_ms = [s * 1e3 for s in probe.step_seconds]
        qat_begin = int(round(800 * args.steps / RECIPE_STEPS))
        trained = {"cache_key": {k: v for k, v in cache_key.items() if k != "test_limit"},
                   "checkpoint": checkpoint.last_model_path or checkpoint.best_model_path, "export_args": export_args,
                   "initial_fingerprint": probe.initial_fingerprint, "fit_seconds": time.perf_counter() - started,
                   "step_ms_median": C.median(steps_ms), "step_ms_median_before_qat": C.median(steps_ms[:qat_begin]),
                   "step_ms_median_qat": C.median(steps_ms[qat_begin:]) if steps_ms[qat_begin:] else None,
                   "steps": len(steps_ms)}
        trained_record.write_text(json.dumps(trained, indent=2))
    print(f"[bench] {row.name}, {key} distillation{options}: export and test", file=sys.stderr, flush=True)
    tflite = root / "model.tflite"
    export_args = {**trained["export_args"], **({"min_agreement": 0.0} if args.quick else {})}  # quick: untrained
    report = export_checkpoint(Path(trained["checkpoint"]), tflite, export_args, args.steps)
    from sparselite.runtime.litert import LiteRTModel

    result = {"row": row.name, "distillation": distillation, "cache_key": cache_key,
              **{k: v for k, v in trained.items() if k != "cache_key"},
              "int8_top1": LiteRTModel(tflite).evaluate(test)["accuracy"], "int8_bytes": tflite.stat().st_size,
              "parity_top1_agreement": report.parity.top1_agreement if report.parity else None}
    saved.write_text(json.dumps(result, indent=2))
    return result


def export_checkpoint(checkpoint: Path, tflite: Path, export_args: dict, steps: int):
    """``sparselite export <checkpoint>``: the run rebuilt from its config.yaml, masks and ranges restored, the
    recipe's TFLiteExport options."""
    from sparselite.checkpoints import load_checkpoint
    from sparselite.export.callback import TFLiteExport
    from sparselite.export.from_loader import export_from_loader
    from sparselite.lightning_cli import restore_run
    from sparselite.pruning.channel_callback import ChannelPruning

    step = load_checkpoint(checkpoint).get("global_step")
    if step != steps:
        raise SystemExit(f"{checkpoint} is from step {step}, not the run's last ({steps})")
    options = TFLiteExport(**{**export_args, "path": str(tflite)}).options
    with _quietly():
        run = restore_run(checkpoint)
        run.datamodule.setup("validate")
        channel = run.callback(ChannelPruning)
        return export_from_loader(run.module, run.datamodule.val_dataloader(), tflite, options,
                                  channel_pruner=None if channel is None else channel.pruner)


def describe(distillation: dict) -> str:
    return ", ".join(f"{'T' if k == 'temperature' else k}={v:g}" for k, v in sorted(distillation.items()) if k != "teacher")


def other_settings(out: Path, index: int, shown: dict) -> list[dict]:
    """The row's distilled runs with other --temperature / --weight (same teacher and steps), kept next to it:
    a row re-run with another setting shows both, not only the better one."""
    found = []
    for path in sorted((out / "runs").glob(f"{index}_with*/result.json")):
        if path.parent.name.startswith(f"{index}_without"):
            continue
        result = json.loads(path.read_text())
        key, own = result.get("cache_key", {}), shown["cache_key"]
        if [key.get(k) for k in ("teacher", "steps", "test_limit", "start", "seed")] == \
                [own.get(k) for k in ("teacher", "steps", "test_limit", "start", "seed")] \
                and result["distillation"] != shown["distillation"]:
            found.append(result)
    return found


def step_overhead(teacher: torch.nn.Module, data: C.Data, turns: int, batch_size: int = 128, sparsity: float = 0.8,
                  width: float = 1.0) -> dict:
    """Step time of a QAT student (fake-quant on) with and without the (full, float) teacher, interleaved: the
    80%-sparse student (masks do not shrink the compute), or (``width=0.5``) one with half the channels of every
    layer, the shape ChannelPruning leaves, against which the teacher's forward weighs most."""
    from sparselite.distillation.distiller import Distiller
    from sparselite.distillation.teacher import resolve_teacher
    from sparselite.models.classifier import ImageClassifier
    from sparselite.models.mobilenet import MobileNetLite
    from sparselite.pruning.pruner import MagnitudePruner
    from sparselite.pruning.schedule import PolynomialDecay
    from sparselite.quantization.qat import QuantizationSimulator

    torch.manual_seed(0)
    full = MobileNetLite()
    blocks = [(max(1, int(block[0].out_channels * width)), block[1].stride[0]) for block in _blocks(full)]
    student = ImageClassifier(MobileNetLite(stem_channels=int(32 * width), blocks=blocks) if width != 1.0 else full,
                              lr=0.005)
    pruner = None
    if sparsity:
        pruner = MagnitudePruner(PolynomialDecay(final_sparsity=sparsity, begin_step=0, end_step=1, frequency=1))
        pruner.prepare(student)
        pruner.step(1)
    simulator = QuantizationSimulator(begin_step=0)
    simulator.prepare(student, (data.val_x[:1],))
    distiller = Distiller(resolve_teacher(teacher, student))
    distiller.attach(student, "")
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    stream = C.BatchStream(data.train_x, data.train_y, batch_size)
    student.train()

    def one_step(distil: bool) -> float:
        x, y = stream.next()
        started = time.perf_counter()
        with distiller.capture():
            loss = F.cross_entropy(student(x), y)
        if distil:
            loss = distiller.add(loss, step=0)
        else:
            distiller._calls = []  # drop the captured call: the teacher does not run
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if pruner is not None:
            pruner.apply_masks()
        return time.perf_counter() - started

    for _ in range(3):  # warm-up
        one_step(True), one_step(False)
    ratios, plain, distilled = [], [], []
    for turn in range(turns):
        order = (False, True) if turn % 2 else (True, False)
        times = {distil: one_step(distil) for distil in order}
        plain.append(times[False] * 1e3)
        distilled.append(times[True] * 1e3)
        ratios.append(times[True] / times[False])
    return {"median_ratio": C.median(ratios), "ratio_of_medians": C.median(distilled) / C.median(plain),
            "plain_ms": C.median(plain), "distilled_ms": C.median(distilled), "turns": turns,
            "student": f"{sparsity:.0%} sparse" if width == 1.0 else f"{width:.0%} of the channels",
            "student_params": sum(p.numel() for p in student.parameters())}


def _blocks(model: torch.nn.Module) -> list:
    """(pointwise conv, depthwise conv) of each depthwise-separable block of MobileNetLite, in order."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    depthwise = [c for c in convs if c.groups > 1]
    pointwise = [convs[convs.index(d) + 1] for d in depthwise]
    return list(zip(pointwise, depthwise))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=RECIPE_STEPS, help="training steps of every model")
    parser.add_argument("--rows", nargs="+", type=int, default=list(range(len(ROWS))),
                        help=f"which rows (0..{len(ROWS) - 1}): " + "; ".join(f"{i} {r.name}" for i, r in enumerate(ROWS)))
    parser.add_argument("--temperature", type=float, default=None, help="Distillation's (default: the recipe's)")
    parser.add_argument("--weight", type=float, default=None, help="Distillation's (default: the recipe's)")
    parser.add_argument("--config", type=Path, default=CONFIG,
                        help="the model, data and trainer config (default: the demo's; the controlled step-time "
                             "measure is the demo model's and runs with it only)")
    parser.add_argument("--start", choices=("scratch", "dense"), default="scratch",
                        help="scratch: every model from the config's seeded initialization; dense: the students start "
                             "from the trained teacher's weights (`sparselite fit --initial_weights`), as when a user "
                             "compresses a model already trained")
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help="training steps of the dense teacher (default: --steps). A teacher that stops short of "
                             "converging is weaker than a student fine-tuned from it for --steps more, and teaches it "
                             "nothing: train it longer")
    parser.add_argument("--seed", type=int, default=None,
                        help="the students' seed_everything (default: the config's): their initialization from "
                             "scratch; the teacher stays the config's. With --start dense it changes nothing: "
                             "FashionMNISTDataModule shuffles with its own fixed generator (exact resume)")
    parser.add_argument("--test-limit", type=int, default=10000)
    parser.add_argument("--overhead-turns", type=int, default=30, help="interleaved step pairs (0: skip)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 30 steps, 2 rows, 1000 test images")
    parser.add_argument("--out", default=None, help="runs, files and the teacher cache (default: "
                        "runs/bench_distillation, or runs/bench_distillation_<config> for another --config)")
    parser.add_argument("--retrain-teacher", action="store_true")
    parser.add_argument("--retrain", action="store_true", help="retrain the rows even if their results are kept")
    parser.add_argument("--json", default=None)
    parser.add_argument("--txt", default=None, help="also write the printed table here")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.test_limit, args.overhead_turns, args.teacher_steps, args.seed = 30, 1000, 8, None, None
        if args.rows == list(range(len(ROWS))):
            args.rows = [0, 2]
    C.quiet_logs()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    env = C.environment()
    data = C.load_data()
    from sparselite.data.fashion_mnist import resize_images
    from sparselite.lightning_cli import build_datamodule

    datamodule = build_datamodule([str(args.config)])  # the config's image size and channels
    test_x = resize_images(data.test_x[: args.test_limit], datamodule.image_size, datamodule.channels)
    test_y = data.test_y[: args.test_limit]
    test = DataLoader(TensorDataset(test_x, test_y), batch_size=500)
    args.config = args.config.resolve()
    out = Path(args.out or ("runs/bench_distillation" + ("" if args.config == CONFIG else f"_{args.config.stem}")))
    args.out = str(out)
    (recipe_entry,) = [cb for cb in yaml.safe_load(DISTILL_RECIPE.read_text())["trainer"]["callbacks"]
                       if cb["class_path"].endswith("Distillation")]
    options = {"temperature": float(recipe_entry["init_args"]["temperature"]), "weight": float(recipe_entry["init_args"]["weight"])}
    options.update({k: v for k, v in (("temperature", args.temperature), ("weight", args.weight)) if v is not None})

    from sparselite.lightning_cli import restore_run

    args.teacher_steps = args.teacher_steps or args.steps
    teacher_path, teacher_key = dense_teacher(out, args.teacher_steps, args.retrain_teacher, args.config)
    with _quietly():
        teacher = restore_run(teacher_path).module
    dense_fp32 = C.torch_accuracy(teacher, test_x, test_y)
    print(f"[bench] dense fp32 (torch) top-1 {dense_fp32:.2%}", file=sys.stderr, flush=True)

    results = []
    for index in args.rows:
        row = ROWS[index]
        without = train_and_measure(row, index, None, args, teacher_path, teacher_key, test)
        with_ = train_and_measure(row, index, {"teacher": str(teacher_path), **options}, args, teacher_path,
                                  teacher_key, test)
        results.append({"index": index, "row": row.name, "recipe": f"recipes/{row.recipe}.yaml" + (
            f" (final_sparsity {row.unstructured})" if row.unstructured else ""),
            "without": without, "with": with_,
            "same_initialization": without["initial_fingerprint"] == with_["initial_fingerprint"],
            "step_ratio": with_["step_ms_median"] / without["step_ms_median"],
            "other_settings": other_settings(out, index, with_)})
    results.sort(key=lambda r: r["index"])  # --rows may ask for them in another order (the targets' rows first)
    overhead = [step_overhead(teacher, data, args.overhead_turns),
                step_overhead(teacher, data, args.overhead_turns, sparsity=0.0, width=0.5)] if args.overhead_turns and args.config == CONFIG else []

    headers = ["row", "int8 top-1 without", "with distillation", "vs dense fp32 without", "with", "target", "met",
               "same init", "step ms without", "with", "ratio"]
    rows = []
    for r in results:
        # The accuracy targets are the demo model's (issue 24); another model's rows have "never worse" only.
        target = TARGETS.get(r["row"]) if args.config == CONFIG else None
        wo = r["without"]["int8_top1"]
        for label, run in [(r["row"], r["with"]), *((f"  same, {describe(o['distillation'])}", o)
                                                      for o in r["other_settings"])]:
            w = run["int8_top1"]
            met = (w >= wo) if target is None else ((w - dense_fp32) * 100 >= target - 1e-9 and w >= wo)
            rows.append([label, f"{wo:.2%}", f"{w:.2%}", f"{(wo - dense_fp32) * 100:+.2f}", f"{(w - dense_fp32) * 100:+.2f}",
                         ">= without" if target is None else f">= {target:+.1f}, >= without", C.fmt(met),
                         C.fmt(r["without"]["initial_fingerprint"] == run["initial_fingerprint"]),
                         f"{r['without']['step_ms_median']:.0f}", f"{run['step_ms_median']:.0f}",
                         f"{run['step_ms_median'] / r['without']['step_ms_median']:.2f}x"])
    lines = [C.environment_line(env),
             f"# {type(getattr(teacher, 'model', teacher)).__name__} on Fashion-MNIST: sparselite fit -c configs/{args.config.name} -c <row's recipe>, "
             f"{args.steps} steps per model; {args.test_limit} test images; teacher and reference: recipes/dense.yaml"
             + ("" if args.teacher_steps == args.steps else f" ({args.teacher_steps} steps)") + ", "
             + ("students start from the teacher's weights (--initial_weights), "
                if args.start == "dense" else "every model from the same seeded initialization, ") +
             f"dense fp32 (torch) top-1 {dense_fp32:.2%}; Distillation {describe(options)}"
             + ("" if args.seed is None else f"; students' seed_everything {args.seed}"),
             C.table(headers, rows),
             "", "step ms: median training step of the run itself (Lightning batch start to end), without / with the "
             "teacher; the other core was busy"]
    for o in overhead:
        lines += [f"step time with the teacher / without, controlled ({o['student']} + QAT student, "
                  f"{o['student_params']:,} weights, batch 128, interleaved {o['turns']} turns): median "
                  f"{o['median_ratio']:.2f}x (ratio of medians {o['ratio_of_medians']:.2f}x; {o['plain_ms']:.0f} -> "
                  f"{o['distilled_ms']:.0f} ms); target <= {TARGETS['overhead']:.2f}x: "
                  f"{C.fmt(o['median_ratio'] <= TARGETS['overhead'])}"]
    text = "\n".join(lines)
    print(text)
    if args.txt:
        Path(args.txt).parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["# OMP_NUM_THREADS=1 MKL_NUM_THREADS=1" if torch.get_num_threads() == 1 else "#",
                             ".venv/bin/python -m benchmarks.distillation", *sys.argv[1:]])
        Path(args.txt).write_text(C.without_machine_paths(command + "\n" + text + "\n"))
    C.write_json(args.json, {"environment": env, "args": {**vars(args), "config": str(args.config.relative_to(REPO))}, "steps": args.steps, "dense_fp32": dense_fp32,
                             "teacher_checkpoint": str(teacher_path), "rows": results, "overhead": overhead,
                             "options": options})


if __name__ == "__main__":
    main()
