"""Shared helpers for the benchmark scripts: data, a plain-PyTorch GMP + QAT training loop, tables, JSON.

Not a benchmark itself. The training loop uses the framework-free cores (``MagnitudePruner`` +
``PolynomialDecay``, ``QuantizationSimulator``) the Lightning callbacks wrap, with the optimizer and
LR schedule of ``ImageClassifier`` (``adamw_one_cycle``), the data split of ``FashionMNISTDataModule``,
the learning rate of ``configs/fmnist_mobilenet.yaml`` and the schedule of ``recipes/gmp80_qat_export.yaml``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import inspect

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from sparselite.data.fashion_mnist import FashionMNISTDataModule
from sparselite.models.classifier import ImageClassifier, adamw_one_cycle, top1_accuracy
from sparselite.pruning.pruner import MagnitudePruner
from sparselite.pruning.schedule import PolynomialDecay
from sparselite.quantization.qat import QuantizationSimulator

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "fmnist_mobilenet.yaml"
RECIPE = REPO / "recipes" / "gmp80_qat_export.yaml"


@dataclass
class Data:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_data() -> Data:
    """FashionMNISTDataModule's split: train minus the held-out validation images, validation, test."""
    datamodule = FashionMNISTDataModule()
    datamodule.setup()
    return Data(*datamodule.train_set.tensors, *datamodule.val_set.tensors, *datamodule.test_set.tensors)


class BatchStream:
    """Endless shuffled mini-batches (a new permutation each epoch, seeded)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0, transform=None) -> None:
        self.x, self.y, self.batch_size, self.transform = x, y, batch_size, transform
        self.generator = torch.Generator().manual_seed(seed)
        self._order, self._pos = torch.randperm(len(x), generator=self.generator), 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pos + self.batch_size > len(self._order):
            self._order, self._pos = torch.randperm(len(self.x), generator=self.generator), 0
        idx = self._order[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return (self.transform(self.x[idx]) if self.transform else self.x[idx]), self.y[idx]


def _config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def make_optimizer(model: nn.Module, steps: int):
    """ImageClassifier's optimizer, with the learning rate of configs/fmnist_mobilenet.yaml."""
    defaults = inspect.signature(ImageClassifier).parameters
    init_args = _config()["model"]["init_args"]
    lr = init_args.get("lr", defaults["lr"].default)
    weight_decay = init_args.get("weight_decay", defaults["weight_decay"].default)
    return adamw_one_cycle(model.parameters(), steps, lr, weight_decay)


def _recipe_schedule() -> dict[str, float]:
    """recipes/gmp80_qat_export.yaml's schedule as fractions of the config's max_steps (prune over steps
    100..700 every 50, QAT from 800, frozen at 1100, of 1200), so it scales to any run length."""
    total = _config()["trainer"]["max_steps"]
    callbacks = {cb["class_path"].rsplit(".", 1)[-1]: cb.get("init_args", {})
                 for cb in yaml.safe_load(RECIPE.read_text())["trainer"]["callbacks"]}
    prune, qat = callbacks["GradualPruning"], callbacks["QuantizationAwareTraining"]
    return {
        "prune_begin": prune["begin_step"] / total,
        "prune_end": prune["end_step"] / total,
        "prune_updates": (prune["end_step"] - prune["begin_step"]) // prune["frequency"],
        "qat_start": qat["begin_step"] / total,
        "qat_freeze": qat["freeze_step"] / total,
    }


_SCHEDULE = _recipe_schedule()


@dataclass
class Compression:
    """Where pruning and QAT sit in a run of ``steps`` steps: the recipe's schedule, scaled."""

    pattern: str | None = "unstructured"  # None: no pruning
    sparsity: float = 0.8
    qat: bool = True
    prune_begin: float = _SCHEDULE["prune_begin"]
    prune_end: float = _SCHEDULE["prune_end"]
    prune_updates: int = _SCHEDULE["prune_updates"]  # mask updates over the ramp
    qat_start: float = _SCHEDULE["qat_start"]
    qat_freeze: float = _SCHEDULE["qat_freeze"]

    def build(self, model: nn.Module, steps: int) -> tuple[MagnitudePruner | None, QuantizationSimulator | None]:
        pruner = simulator = None
        if self.pattern is not None:
            begin, end = int(self.prune_begin * steps), max(int(self.prune_end * steps), int(self.prune_begin * steps) + 1)
            schedule = PolynomialDecay(final_sparsity=self.sparsity, begin_step=begin, end_step=end,
                                       frequency=max(1, (end - begin) // self.prune_updates))
            pruner = MagnitudePruner(schedule, pattern=self.pattern)
            pruner.prepare(model)
        if self.qat:
            start = int(self.qat_start * steps)
            freeze = max(int(self.qat_freeze * steps), start + 1)
            simulator = QuantizationSimulator(begin_step=start, freeze_step=freeze)
            simulator.prepare(model)
        return pruner, simulator


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    step_ms: list[float] = field(default_factory=list)


class StepHooks(Protocol):
    """What a benchmark's own recipe does around each step (the Lightning callbacks' hooks)."""

    def before_step(self, step: int, optimizer: torch.optim.Optimizer) -> None: ...

    def after_step(self) -> None: ...

    def after_training(self, steps: int) -> None: ...


def train(model: nn.Module, data: Data, steps: int, pruner: MagnitudePruner | None = None,
          simulator: QuantizationSimulator | None = None, batch_size: int = 128, seed: int = 0,
          log_every: int = 0, label: str = "", transform=None, hooks: StepHooks | None = None) -> TrainResult:
    """Plain PyTorch loop; the per-step order is the Lightning callbacks' order (step hooks, then
    forward/backward/optimizer, then apply_masks). ``transform`` maps each batch of Fashion-MNIST
    images to the model's input; ``hooks`` run a recipe of the caller's around each step."""
    torch.manual_seed(seed)
    stream = BatchStream(data.train_x, data.train_y, batch_size, seed, transform=transform)
    optimizer, scheduler = make_optimizer(model, steps)
    model.train()
    losses, times = [], []
    start = time.perf_counter()
    for step in range(steps):
        t0 = time.perf_counter()
        if hooks is not None:
            hooks.before_step(step, optimizer)
        if simulator is not None:
            simulator.step(step)
        if pruner is not None:
            pruner.step(step)
        x, y = stream.next()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if pruner is not None:
            pruner.apply_masks()
        if hooks is not None:
            hooks.after_step()
        times.append((time.perf_counter() - t0) * 1e3)
        losses.append(float(loss))
        if log_every and (step + 1) % log_every == 0:
            print(f"  [{label}] step {step + 1}/{steps} loss {statistics.fmean(losses[-log_every:]):.3f} "
                  f"({statistics.median(times[-log_every:]):.0f} ms/step)", file=sys.stderr, flush=True)
    if simulator is not None:
        simulator.step(steps)  # leave it in the phase the last step ended in (frozen ranges + BN)
    if hooks is not None:
        hooks.after_training(steps)
    return TrainResult(steps, time.perf_counter() - start, statistics.fmean(losses[-20:]), times)


def scale_batchnorm_momentum(model: nn.Module, momentum: float = 0.1) -> None:
    """Raise every BatchNorm's running-statistics momentum to at least ``momentum``.

    torchvision gives MobileNetV3's and EfficientNet's BatchNorms momentum 0.01, made for ImageNet-length
    runs. After the few hundred steps of a benchmark their running statistics (which eval mode and the
    int8 fold use) still hold 0.99**200 = 13% of their initial values: the model trains, but is at chance
    in eval mode. Like the ranges' averaging constant, the momentum is scaled to the step budget; layers
    that already use 0.1 (the torch default) are unchanged."""
    for norm in model.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.momentum is not None:
            norm.momentum = max(norm.momentum, momentum)


def torch_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    return top1_accuracy(model, x, y, batch)


def reset_peak_rss() -> None:
    """Start a new peak-RSS window for this process (Linux: writing 5 to clear_refs resets VmHWM), so
    ``peak_rss_bytes`` measures one phase (an export) and not the training before it."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """This process's peak resident memory since ``reset_peak_rss`` (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (peak RSS is measured on Linux only)")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def fmt(value, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec) if spec else str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: Sequence[int] = (0,)) -> str:
    """A plain-text table: columns right-aligned (numbers), except those in ``left`` (text)."""
    cells = [list(map(str, headers))] + [list(map(str, row)) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def environment() -> dict:
    import importlib.metadata as md

    versions = {}
    for dist in ("torch", "lightning", "litert-torch", "ai-edge-litert", "torchao"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "int8_features": int8_cpu_features(),
        "torch_threads": torch.get_num_threads(), "load_avg_at_start": os.getloadavg(),
        "git_commit": commit, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **versions,
    }


# The x86 extensions XNNPACK's int8 kernels speed up with: its int8/fp32 ratios differ a lot between them.
INT8_CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def int8_cpu_features() -> str:
    """The INT8_CPU_FEATURES this CPU has (from /proc/cpuinfo; '?' where it cannot be read)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith(("flags", "Features"))), [])
    except OSError:
        return "?"
    return "+".join(f for f in INT8_CPU_FEATURES if f in flags) or "none of " + "/".join(INT8_CPU_FEATURES)


def environment_line(env: dict) -> str:
    return (f"# {env['time_utc']}  commit {env['git_commit']}  {env['machine']} {env['cpus']} cpus "
            f"[{env.get('int8_features', '?')}] "
            f"(torch threads {env['torch_threads']}, load avg {env['load_avg_at_start'][0]:.2f})  "
            f"torch {env['torch']}  litert-torch {env['litert-torch']}  ai-edge-litert {env['ai-edge-litert']}")


def without_machine_paths(text: str) -> str:
    """Paths in this checkout made relative to it, temporary ones written ``<tmp>/...``: a saved result
    names no machine's folders."""
    text = text.replace(str(REPO) + os.sep, "").replace(str(REPO), ".")
    return re.sub(re.escape(tempfile.gettempdir().rstrip(os.sep) + os.sep), "<tmp>/", text)


def write_json(path: str | None, payload: dict | list) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(without_machine_paths(json.dumps(payload, indent=2, default=str)))
    print(f"\nJSON written to {path}")


def quiet_logs() -> None:
    """Keep absl/TF/litert chatter off the tables."""
    import logging
    import warnings

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore")
    for name in ("torch", "torchao", "litert_torch", "absl", "tensorflow", "lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
