"""``sparselite sensitivity``: the run's model and data built from its configs (as ``sparselite fit`` builds
them), a dense model to measure (a checkpoint, or a short dense training), the sweep of
``pruning/sensitivity.py``, and its outputs: a table (CSV and stdout), a plot, and a recipe whose
``GradualPruning`` carries one ``overrides`` entry per layer.

Each measured point is saved as it comes (``sensitivity.json``), and so is the dense model
(``dense.pt``): after an interrupt, the same command goes on where it stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from sparselite.errors import SparseliteError
from sparselite.pruning import sensitivity as core
from sparselite.tflite.flatbuffer import write_atomically

RESULTS = "sensitivity.json"


@dataclass
class SensitivitySettings:
    configs: list[str]
    out: Path
    target: float | None = None  # default: the recipe's final_sparsity
    grid: tuple[float, ...] = core.DEFAULT_GRID
    checkpoint: str | None = None
    pretrain_steps: int | None = None  # default: the config's trainer.max_steps
    fine_tune_steps: int = 0
    fine_tune_lr: float = 1e-4
    val_batches: int | None = None  # default: all
    recipe: Path | None = None  # default: <out>/recipe.yaml


class Progress:
    """One line per event when stdout is not a terminal; one line rewritten in place when it is."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._open = False

    def __call__(self, text: str, keep: bool = True) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if keep else ""))
            self._open = not keep
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def _build_run(settings: SensitivitySettings, progress: Progress):
    """(the run as ``sparselite fit`` builds it, its GradualPruning callback); refuses configs without one."""
    from sparselite.lightning_cli import _lightning_info_off, build_lightning_cli
    from sparselite.pruning.callback import GradualPruning

    progress(f"[sensitivity] building the run from {', '.join(settings.configs)}")
    with _lightning_info_off(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = build_lightning_cli([arg for c in settings.configs for arg in ("-c", c)], run=False)
    pruning = next((cb for cb in cli.trainer.callbacks if isinstance(cb, GradualPruning)), None)
    if pruning is None:
        raise SparseliteError("the configs have no GradualPruning callback; sensitivity measures the layers it selects "
                              "(pattern, include/exclude) and writes its overrides: add a pruning recipe with -c")
    if pruning.pruner.pattern.kind == "n:m":
        raise SparseliteError(f"pattern {pruning.pruner.pattern} fixes every layer's sparsity; sensitivity needs a free one")
    return cli, pruning


def run_sensitivity(settings: SensitivitySettings) -> core.Allocation:
    progress = Progress()
    cli, pruning = _build_run(settings, progress)
    target = pruning.pruner.schedule.final_sparsity if settings.target is None else settings.target
    model, datamodule = cli.model, cli.datamodule
    settings.out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(settings, cli)

    datamodule.setup("fit")
    _dense_model(model, datamodule, settings, fingerprint, progress, cli)
    datamodule.setup("validate")
    val_loader = datamodule.val_dataloader()
    if not val_loader:
        raise SparseliteError("the run's datamodule has no validation data; sensitivity measures validation loss")
    val = [batch for _, batch in zip(range(settings.val_batches or 10**9), val_loader)]
    layers = pruning.prepare(model)
    weights = {name: layer.weight for name, layer in layers.items()}  # a recurrent layer has one per gate matrix
    patterns = {name: layer.pattern for name, layer in layers.items()}
    fine_tune = None
    if settings.fine_tune_steps > 0:
        fine_tune = _fine_tuner(datamodule, settings.fine_tune_steps, settings.fine_tune_lr)

    results_path = settings.out / RESULTS
    known = _load_points(results_path, fingerprint)
    points: dict[str, core.Point] = dict(known)
    started = time.perf_counter()
    if known:
        progress(f"[sensitivity] {len(known)} points measured before are reused ({results_path})")
    progress(f"[sensitivity] {len(weights)} layers x {len(settings.grid)} sparsities "
             f"({', '.join(f'{s:.0%}' for s in settings.grid)}), {len(val)} validation batches"
             + (f", {settings.fine_tune_steps} fine-tune steps each" if fine_tune else ", no fine-tune"))

    def on_point(done: int, total: int, layer: str, point: core.Point, reused: bool) -> None:
        key = core.point_key("" if layer == "(unpruned)" else layer, point.sparsity)
        points[key] = point
        if not reused:
            _save_points(results_path, fingerprint, points)
        elapsed = time.perf_counter() - started
        measured = done - len(known) if not reused else 0
        eta = f", ~{elapsed / max(measured, 1) * (total - done):.0f} s left" if measured > 0 and done < total else ""
        progress(f"[sensitivity] {done}/{total} {layer} at {point.sparsity:.0%}: val loss {point.loss:.4f}, "
                 f"top-1 {point.accuracy:.2%}{' (measured before)' if reused else ''}{eta}", keep=not progress.tty or done == total)

    curves = core.measure_sensitivity(model, weights, patterns, settings.grid,
                                      lambda m: core.evaluate_classifier(m, val), fine_tune=fine_tune, known=known,
                                      on_point=on_point)
    progress.close()
    allocation = core.allocate(curves, target)
    _write_outputs(settings, curves, allocation, target, pruning, patterns)
    return allocation


def _fingerprint(settings: SensitivitySettings, cli) -> str:
    """What the measured points depend on: the configs as parsed, the dense model's source, the sweep's settings."""
    config = cli.parser.dump(cli.config, skip_none=False) if hasattr(cli, "parser") else ""
    parts = [config, str(settings.checkpoint), str(settings.pretrain_steps), str(settings.fine_tune_steps),
             str(settings.fine_tune_lr), str(settings.val_batches)]
    if settings.checkpoint:
        parts.append(str(Path(settings.checkpoint).stat().st_mtime_ns))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _load_points(path: Path, fingerprint: str) -> dict[str, core.Point]:
    try:
        data = json.loads(path.read_text())
        if data.get("fingerprint") != fingerprint:
            return {}
        return {key: core.Point(*value) for key, value in data["points"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _save_points(path: Path, fingerprint: str, points: dict[str, core.Point]) -> None:
    data = {"fingerprint": fingerprint, "points": {k: [p.sparsity, p.loss, p.accuracy] for k, p in points.items()}}
    write_atomically(path, json.dumps(data, indent=1).encode())


def _batches(loader):
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise SparseliteError("the run's training data gave no batches")


def _loss(model, batch) -> torch.Tensor:
    inputs, labels = batch[0], batch[1]
    output = model(inputs)
    return F.cross_entropy(output[0] if isinstance(output, (tuple, list)) else output, labels)


def _dense_model(model, datamodule, settings: SensitivitySettings, fingerprint: str, progress: Progress, cli) -> None:
    """Put the dense weights to measure in ``model``: a checkpoint's, cached ones, or a short dense training."""
    if settings.checkpoint:
        from sparselite.checkpoints import load_checkpoint

        state = {k: v for k, v in load_checkpoint(Path(settings.checkpoint))["state_dict"].items() if "sparselite_" not in k}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SparseliteError(f"{settings.checkpoint} does not match the configured model (missing "
                                  f"{missing[:3]}, unexpected {unexpected[:3]}); give a dense checkpoint of this config")
        progress(f"[sensitivity] dense weights from {settings.checkpoint}")
        return
    cache = settings.out / "dense.pt"
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved.get("fingerprint") == fingerprint:
            model.load_state_dict(saved["state_dict"])
            progress(f"[sensitivity] dense weights from {cache} (trained before)")
            return
    steps = settings.pretrain_steps if settings.pretrain_steps is not None else cli.trainer.max_steps
    if not isinstance(steps, int) or steps < 1:
        raise SparseliteError("no dense model to measure: give --checkpoint (a dense run of this config) or --pretrain-steps")
    from sparselite.models.classifier import adamw_one_cycle

    hparams = getattr(model, "hparams", {})
    optimizer, scheduler = adamw_one_cycle(model.parameters(), steps, float(hparams.get("lr", 1e-3)),
                                           float(hparams.get("weight_decay", 0.0)))
    model.train()
    started = time.perf_counter()
    every = max(1, min(100, steps // 10))
    for step, batch in zip(range(1, steps + 1), _batches(datamodule.train_dataloader())):
        loss = _loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % every == 0 or step == steps:
            rate = (time.perf_counter() - started) / step
            progress(f"[sensitivity] dense training {step}/{steps}: loss {float(loss.detach()):.4f}, {rate * 1e3:.0f} ms/step",
                     keep=not progress.tty or step == steps)
    model.eval()
    torch.save({"fingerprint": fingerprint, "state_dict": model.state_dict()}, cache)


def _fine_tuner(datamodule, steps: int, lr: float):
    stream = _batches(datamodule.train_dataloader())

    def fine_tune(model, weight, mask) -> None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        model.train()
        for _, batch in zip(range(steps), stream):
            loss = _loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                weight.mul_(mask)
        model.eval()

    return fine_tune


def _write_outputs(settings: SensitivitySettings, curves, allocation: core.Allocation, target: float, pruning, patterns) -> None:
    out = settings.out
    import csv
    import io

    rows = core.table_rows(curves, allocation)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(out / "sensitivity.csv", text.getvalue().encode())
    core.plot_curves(curves, allocation, str(out / "sensitivity.png"))
    recipe_path = settings.recipe or out / "recipe.yaml"
    uniform = core.uniform_loss_increase(curves, target)
    recipe = _recipe(settings.configs, pruning, allocation, patterns)
    header = (f"# Written by `sparselite sensitivity` from {', '.join(settings.configs)}.\n"
              f"# Per-layer targets (overrides) reach {allocation.overall:.1%} overall over the pruned layers' weights,\n"
              f"# predicted validation-loss increase {allocation.predicted_loss_increase:.4f}"
              + (f" (uniform {target:.0%}: {uniform:.4f})" if uniform is not None else "") + ".\n"
              f"# Train it: sparselite fit -c <the model+data config> -c {recipe_path}\n")
    write_atomically(recipe_path, (header + yaml.safe_dump(recipe, sort_keys=False)).encode())
    print(core.format_table(curves, allocation))
    print(f"\nvalidation top-1 (%) with each layer pruned alone; 'target': the allocated sparsity for {target:.0%} overall "
          f"(reached: {allocation.overall:.1%}, predicted loss increase {allocation.predicted_loss_increase:.4f}"
          + (f", uniform {uniform:.4f}" if uniform is not None else "") + ")")
    print(f"table: {out / 'sensitivity.csv'}\nplot: {out / 'sensitivity.png'}\nrecipe: {recipe_path}")


def _is_pruning(callback: Any) -> bool:
    return isinstance(callback, dict) and str(callback.get("class_path", "")).rsplit(".", 1)[-1] == "GradualPruning"


def _recipe(configs: list[str], pruning, allocation: core.Allocation, patterns) -> dict[str, Any]:
    """The recipe that held the GradualPruning callback, with its overrides set to the allocation (and its
    run folder and export path moved beside the original's); a recipe of that callback alone otherwise."""
    default = str(pruning.pruner.pattern)
    overrides = {}
    for layer, sparsity in allocation.targets.items():
        entry: dict[str, Any] = {"final_sparsity": float(sparsity)}
        if str(patterns[layer]) != default:
            entry["pattern"] = str(patterns[layer])
        overrides[re.escape(layer)] = entry
    for config in reversed(configs):
        try:
            data = yaml.safe_load(Path(config).read_text())
        except (OSError, yaml.YAMLError):
            continue
        callbacks = ((data or {}).get("trainer") or {}).get("callbacks") if isinstance(data, dict) else None
        if isinstance(callbacks, list) and any(_is_pruning(cb) for cb in callbacks):
            recipe = copy.deepcopy(data)
            trainer = recipe["trainer"]
            for callback in trainer["callbacks"]:
                if _is_pruning(callback):
                    callback.setdefault("init_args", {})
                    callback["init_args"] = dict(callback["init_args"] or {})
                    callback["init_args"]["final_sparsity"] = float(round(allocation.overall, 4))
                    callback["init_args"]["overrides"] = overrides
            old_root = trainer.get("default_root_dir")
            if isinstance(old_root, str):
                new_root = old_root.rstrip("/") + "_sensitivity"
                trainer["default_root_dir"] = new_root
                for callback in trainer["callbacks"]:
                    args = callback.get("init_args") if isinstance(callback, dict) else None
                    if isinstance(args, dict) and isinstance(args.get("path"), str) and args["path"].startswith(old_root.rstrip("/") + "/"):
                        args["path"] = new_root + args["path"][len(old_root.rstrip("/")):]
            return recipe
    schedule = pruning.pruner.schedule
    return {"trainer": {"callbacks": [{"class_path": "sparselite.GradualPruning", "init_args": {
        "final_sparsity": float(round(allocation.overall, 4)), "begin_step": schedule.begin_step, "end_step": schedule.end_step,
        "frequency": schedule.frequency, "initial_sparsity": schedule.initial_sparsity, "power": schedule.power,
        "pattern": default, "overrides": overrides}}]}}
