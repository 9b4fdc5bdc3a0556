"""Channel pruning on the demo MobileNetLite (or a torchvision model): parameters, MACs, int8 XNNPACK latency,
file size, accuracy.

What it measures, on Fashion-MNIST, for channel ratios 0 / 25 / 50 / 75% (``--ratios``) and 50% channels
combined with 80% unstructured pruning of what remains:
  1. trains every model from the same initialization for ``--steps`` steps (plain PyTorch loop over the
     framework-free cores the callbacks wrap: ``ChannelPruner``, ``MagnitudePruner``,
     ``QuantizationSimulator``), scheduled as recipes/channels50_gmp80_qat_export.yaml scaled to the
     budget: channels masked over 8%..33% of the steps and removed there, unstructured pruning over
     33%..58%, QAT from 67%, ranges/BN frozen from 92%. Ratio 0 is the same run with no pruning (the
     dense int8 reference); a dense fp32 model trained for the same steps without compression is the
     accuracy baseline;
  2. counts MACs and parameters of the float model (torch-pruning's op counter);
  3. exports each with ``export_tflite`` (sparse storage on), evaluates the int8 file on the 10k test
     images on XNNPACK, and compares its top-1 with the fp32 baseline's;
  4. times all int8 files in one interleaved benchmark (batch 1, 1 thread, XNNPACK, medians) and reports
     latency / dense-int8 latency next to MACs / dense MACs (the physical limit is latency ∝ MACs);
  5. plots latency ratio vs MAC ratio to ``--plot`` (PNG).
Targets (issue 10): 50% channels -> int8 latency <= 0.40x and file <= 0.35x of dense int8; combined with
80% unstructured -> file <= 0.15x; int8 accuracy within 1.5 points of dense fp32. With ``--torchvision NAME``
(any torchvision classification model, ``weights=None``, 10 classes, Fashion-MNIST resized to
``--image-size`` and repeated to RGB, as in benchmarks/model_zoo.py) the latency target is 0.45x.

Run (from the repo root):
    .venv/bin/python -m benchmarks.channel_pruning --quick            # smoke run (accuracy meaningless)
    .venv/bin/python -m benchmarks.channel_pruning --steps 300 --json benchmarks/results/channel_pruning_steps300.json \
        --plot benchmarks/results/channel_pruning_steps300.png
    .venv/bin/python -m benchmarks.channel_pruning --torchvision resnet18 --steps 150 --ratios 0 0.5 --no-combined
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from sparselite import LiteRTModel, export_tflite  # noqa: E402
from sparselite.data.fashion_mnist import resize_images  # noqa: E402
from sparselite.models.mobilenet import MobileNetLite  # noqa: E402
from sparselite.pruning.channels import ChannelPruner  # noqa: E402
from sparselite.pruning.dependency import count_macs_and_params  # noqa: E402
from sparselite.pruning.pruner import MagnitudePruner  # noqa: E402
from sparselite.pruning.schedule import PolynomialDecay  # noqa: E402
from sparselite.quantization.qat import QuantizationSimulator  # noqa: E402
from sparselite.runtime.bench import interleaved_benchmark  # noqa: E402

TARGETS = {"latency_50": 0.40, "file_50": 0.35, "file_50_gmp80": 0.15, "accuracy_drop_points": 1.5}
TORCHVISION_LATENCY_50 = 0.45
# recipes/channels50_gmp80_qat_export.yaml, as fractions of its 1200 steps.
CHANNELS_BEGIN, CHANNELS_END = 100 / 1200, 400 / 1200
GMP_END = 700 / 1200
QAT_START, QAT_FREEZE = 800 / 1200, 1100 / 1200
MASK_UPDATES = 6


@contextlib.contextmanager
def stdout_to_stderr():
    with contextlib.redirect_stdout(sys.stderr):
        yield


def workload(torchvision: str | None, image_size: int):
    """(model, example input, transform of Fashion-MNIST's [N, 1, 28, 28] batches to its input, title)."""
    if not torchvision:
        return MobileNetLite(), torch.zeros(1, 1, 28, 28), None, "MobileNetLite"
    import torchvision.models as tvm

    model = getattr(tvm, torchvision)(weights=None, num_classes=10)
    C.scale_batchnorm_momentum(model)
    return (model, torch.zeros(1, 3, image_size, image_size), partial(resize_images, size=image_size, channels=3),
            f"torchvision {torchvision} ({image_size}x{image_size})")


class ChannelRecipe:
    """recipes/channels50_gmp80_qat_export.yaml's order around each step of ``_common.train``: channels
    masked, then removed at their end step; unstructured pruning and QAT attach to the shrunk model."""

    def __init__(self, model: torch.nn.Module, steps: int, channels: float, unstructured: float | None, qat: bool,
                 example: torch.Tensor) -> None:
        self.model, self.steps, self.unstructured, self.qat, self.example = model, steps, unstructured, qat, example
        self.begin = int(CHANNELS_BEGIN * steps)
        self.end = max(int(CHANNELS_END * steps), self.begin + 1)
        self.channel_pruner = None
        if channels > 0:
            self.channel_pruner = ChannelPruner(PolynomialDecay(
                final_sparsity=channels, begin_step=self.begin, end_step=self.end,
                frequency=max(1, (self.end - self.begin) // MASK_UPDATES)))
            self.channel_pruner.prepare(model, example)
        self.gmp: MagnitudePruner | None = None
        self.simulator: QuantizationSimulator | None = None
        self.info: dict = {}

    def before_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if self.channel_pruner is not None and not self.channel_pruner.shrunk:
            self.channel_pruner.step(step)
            if step >= self.end:
                self.channel_pruner.shrink([optimizer])
                self.info["removed_channels"] = self.channel_pruner.channel_ratio()["overall"]
        if step >= self.end or self.channel_pruner is None:
            if self.unstructured and self.gmp is None:
                gmp_end = max(int(GMP_END * self.steps), self.end + 1)
                self.gmp = MagnitudePruner(PolynomialDecay(final_sparsity=self.unstructured, begin_step=self.end,
                                                           end_step=gmp_end,
                                                           frequency=max(1, (gmp_end - self.end) // MASK_UPDATES)))
                self.gmp.prepare(self.model)
            if self.qat and self.simulator is None:
                start = int(QAT_START * self.steps)
                self.simulator = QuantizationSimulator(begin_step=start,
                                                       freeze_step=max(int(QAT_FREEZE * self.steps), start + 1))
                self.simulator.prepare(self.model, (self.example,))  # functional ops (add, mul, cat) get ranges too
        if self.simulator is not None:
            self.simulator.step(step)
        if self.gmp is not None:
            self.gmp.step(step)

    def after_step(self) -> None:
        if self.channel_pruner is not None:
            self.channel_pruner.apply_masks()
        if self.gmp is not None:
            self.gmp.apply_masks()

    def after_training(self, steps: int) -> None:
        if self.simulator is not None:
            self.simulator.step(steps)
        if self.gmp is not None:
            self.info["unstructured_sparsity"] = self.gmp.sparsity()["overall"]


def train(model: torch.nn.Module, data: C.Data, steps: int, channels: float, unstructured: float | None,
          qat: bool, label: str, log_every: int, example: torch.Tensor, transform=None) -> dict:
    recipe = ChannelRecipe(model, steps, channels, unstructured, qat, example)
    result = C.train(model, data, steps, batch_size=128, seed=0, log_every=log_every, label=label, transform=transform,
                     hooks=recipe)
    return {**recipe.info, "train_seconds": result.seconds}


def float_copy(model: torch.nn.Module) -> torch.nn.Module:
    from sparselite.export.conversion import float_model_for_export

    return float_model_for_export(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--torchvision", default=None, metavar="NAME",
                        help="prune this torchvision classification model instead of MobileNetLite")
    parser.add_argument("--image-size", type=int, default=64, help="its input size (Fashion-MNIST resized)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    parser.add_argument("--no-combined", action="store_true", help="skip 50%% channels + 80%% unstructured")
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 steps, 2000 test images, short timing")
    parser.add_argument("--test-limit", type=int, default=10000)
    parser.add_argument("--latency-rounds", type=int, default=10)
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--out-dir", default=None, help="keep the .tflite files here (default: a temp dir)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--txt", default=None, help="also write the printed tables here")
    parser.add_argument("--plot", default=None, help="latency-vs-MACs PNG")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.test_limit, args.latency_rounds, args.latency_runs = 40, 2000, 4, 15
    C.quiet_logs()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    env = C.environment()
    data = C.load_data()
    torch.manual_seed(0)
    base, example, transform, title = workload(args.torchvision, args.image_size)
    as_input = transform or (lambda x: x)
    test_x, test_y = as_input(data.test_x[: args.test_limit]), data.test_y[: args.test_limit]
    verify = as_input(data.val_x[:256])
    targets = TARGETS | ({"latency_50": TORCHVISION_LATENCY_50} if args.torchvision else {})

    print(f"[bench] dense fp32 baseline, {args.steps} steps", file=sys.stderr, flush=True)
    baseline = copy.deepcopy(base)
    baseline_info = train(baseline, data, args.steps, 0.0, None, qat=False, label="fp32", log_every=args.log_every,
                          example=example, transform=transform)
    fp32_acc = C.torch_accuracy(baseline, test_x, test_y)

    configs = [(f"channels {r:.0%}" if r else "dense int8", r, None) for r in args.ratios]
    if not args.no_combined:
        configs.append(("channels 50% + 80% unstructured", 0.5, 0.8))
    out_dir = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="channel_pruning_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    loader = DataLoader(TensorDataset(test_x, test_y), batch_size=500)
    for name, ratio, unstructured in configs:
        print(f"[bench] {name}", file=sys.stderr, flush=True)
        model = copy.deepcopy(base)
        info = train(model, data, args.steps, ratio, unstructured, qat=True, label=name, log_every=args.log_every,
                     example=example, transform=transform)
        macs, params = count_macs_and_params(float_copy(model), example)
        stem = (args.torchvision or "mobilenet") + "_" + name.replace(" ", "_").replace("%", "").replace("+", "plus")
        path = out_dir / f"{stem}_int8.tflite"
        with stdout_to_stderr():
            report = export_tflite(model, example, path, verify_data=[verify], min_agreement=0.0)
        accuracy = LiteRTModel(path).evaluate(loader)["accuracy"]
        rows.append({"name": name, "channels": ratio, "unstructured": unstructured, "macs": macs, "params": params,
                     "file_bytes": report.file_bytes, "xz_bytes": report.xz_bytes, "int8_test_acc": accuracy,
                     "fake_quant_test_acc": C.torch_accuracy(model, test_x, test_y),
                     "parity_top1": report.parity.top1_agreement, "parity_max_lsb": report.parity.max_logit_diff_lsb,
                     "path": str(path), **info})

    print("[bench] latency: all int8 files, interleaved", file=sys.stderr, flush=True)
    latency = interleaved_benchmark({r["name"]: r["path"] for r in rows}, accelerator="xnnpack", threads=1,
                                    rounds=args.latency_rounds, runs_per_round=args.latency_runs)
    dense = next(r for r in rows if r["channels"] == 0 and not r["unstructured"])
    for r in rows:
        r["latency"] = latency[r["name"]].to_dict()
        r["latency_ratio"] = r["latency"]["median_ms"] / latency[dense["name"]].median_ms
        r["mac_ratio"] = r["macs"] / dense["macs"]
        r["param_ratio"] = r["params"] / dense["params"]
        r["file_ratio"] = r["file_bytes"] / dense["file_bytes"]
        r["accuracy_drop_points"] = 100 * (fp32_acc - r["int8_test_acc"])

    lines = [C.environment_line(env),
             f"{title} on Fashion-MNIST, {args.steps} training steps of batch 128 per model (same init, same batches); "
             f"{len(test_x)} test images; XNNPACK, 1 thread, batch 1, {args.latency_rounds}x{args.latency_runs} interleaved runs",
             f"dense fp32 baseline (no compression, same steps): torch top-1 {fp32_acc:.4f}", ""]
    headers = ["model", "params", "MACs", "MAC ratio", "int8 ms", "latency ratio", "lat/MAC", "file B", "file ratio",
               "int8 top-1", "vs fp32 (pts)", "parity"]
    table_rows = [[r["name"], f"{r['params']:,}", f"{r['macs']:,}", f"{r['mac_ratio']:.3f}", f"{r['latency']['median_ms']:.3f}",
                   f"{r['latency_ratio']:.3f}", f"{r['latency_ratio'] / r['mac_ratio']:.2f}", f"{r['file_bytes']:,}",
                   f"{r['file_ratio']:.3f}", f"{r['int8_test_acc']:.4f}", f"{-r['accuracy_drop_points']:+.2f}",
                   f"{r['parity_top1']:.3f}"] for r in rows]
    lines.append(C.table(headers, table_rows))
    half = next((r for r in rows if r["channels"] == 0.5 and not r["unstructured"]), None)
    combined = next((r for r in rows if r["unstructured"]), None)
    checks = []
    if half:
        checks.append(("50% channels: int8 latency / dense int8", half["latency_ratio"], targets["latency_50"]))
        checks.append(("50% channels: file / dense int8", half["file_ratio"], targets["file_50"]))
        checks.append(("50% channels: accuracy drop vs fp32 (points)", half["accuracy_drop_points"], targets["accuracy_drop_points"]))
    if combined:
        checks.append(("50% channels + 80% unstructured: file / dense int8", combined["file_ratio"], targets["file_50_gmp80"]))
        checks.append(("50% channels + 80% unstructured: accuracy drop (points)", combined["accuracy_drop_points"], targets["accuracy_drop_points"]))
    lines += ["", C.table(["target", "measured", "limit", "meets"],
                          [[n, f"{v:.3f}", f"{t:.2f}", C.fmt(v <= t)] for n, v, t in checks])]
    lines += ["", "lat/MAC = latency ratio / MAC ratio: 1.0 would be latency exactly proportional to MACs; above 1 is the",
              "fixed cost (graph, I/O quantize, pooling, small-layer overhead) that removing channels does not shrink."]
    text = "\n".join(lines)
    print(text)
    if args.txt:
        Path(args.txt).parent.mkdir(parents=True, exist_ok=True)
        Path(args.txt).write_text(C.without_machine_paths(text + "\n"))
    if args.plot:
        plot(rows, args.plot, args.steps, title, targets["latency_50"])
    C.write_json(args.json, {"environment": env, "args": vars(args), "fp32_baseline_test_acc": fp32_acc,
                             "fp32_baseline": baseline_info, "targets": targets, "results": rows})


def plot(rows: list[dict], path: str, steps: int, title: str, latency_target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    channel_rows = [r for r in rows if not r["unstructured"]]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="latency ∝ MACs")
    ax.plot([r["mac_ratio"] for r in channel_rows], [r["latency_ratio"] for r in channel_rows], "o-", label="channel pruning, int8")
    for r in channel_rows:
        ax.annotate(f"{r['channels']:.0%}", (r["mac_ratio"], r["latency_ratio"]), textcoords="offset points", xytext=(6, -10))
    for r in rows:
        if r["unstructured"]:
            ax.plot(r["mac_ratio"], r["latency_ratio"], "s", label="50% channels + 80% unstructured")
    ax.axhline(latency_target, color="red", lw=0.8, label=f"target at 50%: {latency_target:.2f}x")
    ax.set_xlabel("MACs / dense MACs")
    ax.set_ylabel("int8 XNNPACK latency / dense int8 (1 thread)")
    ax.set_title(f"{title}, Fashion-MNIST ({steps} steps)")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.1)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
