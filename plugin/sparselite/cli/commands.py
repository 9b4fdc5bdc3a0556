"""The commands that are not LightningCLI's: export, shrink, bench, inspect, demo (and their parsers)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparselite.errors import SparseliteError


def export_command(ns: argparse.Namespace) -> None:
    """Rebuild the run from its config, restore the checkpoint (masks, ranges), export."""
    from sparselite.export.auto_precision import store_choice, stored_choice
    from sparselite.export.destination import check_destination
    from sparselite.export.from_loader import export_from_loader
    from sparselite.export.options import ExportOptions
    from sparselite.export.report import report_path
    from sparselite.lightning_cli import restore_run
    from sparselite.pruning.channel_callback import ChannelPruning

    options = ExportOptions(**{name: getattr(ns, name) for name in ExportOptions.names()})
    check_destination(ns.output, report_path(ns.output))  # before the checkpoint is loaded and the export runs
    run = restore_run(ns.checkpoint, ns.config)
    stored = stored_choice(run.checkpoint) if options.precision == "auto" else None
    if stored is not None:  # chosen once: the same file again, whatever this machine's timings say today
        options = options.with_choice(stored)
        print(f"[sparselite] precision auto: the choice stored in {ns.checkpoint} (precision={stored['precision']!r})")
    run.datamodule.setup("validate")
    channel = run.callback(ChannelPruning)
    report = export_from_loader(run.module, run.datamodule.val_dataloader(), ns.output, options,
                                channel_pruner=None if channel is None else channel.pruner)
    if report.precision_choice is not None:
        store_choice(ns.checkpoint, report.precision_choice)
        print(f"[sparselite] precision auto: the choice is stored in {ns.checkpoint}; exporting it again reuses it")
    print(report.summary())


def shrink_command(ns: argparse.Namespace) -> None:
    """Remove the channels a ChannelPruning run masked (e.g. one with shrink=False); write a smaller checkpoint."""
    import torch

    from sparselite.lightning_cli import restore_run
    from sparselite.pruning.channel_callback import ChannelPruning, without_fake_quant

    run = restore_run(ns.checkpoint, ns.config)
    channel = run.callback(ChannelPruning)
    if channel is None:
        raise SparseliteError("the run's config has no ChannelPruning callback: there are no masked channels to remove")
    state = run.checkpoint["state_dict"]
    if any(key.endswith(("sparselite_output_quant.min_max", "sparselite_input_quant.min_max")) and bool(torch.isfinite(value).all())
           for key, value in state.items()):
        raise SparseliteError(f"{ns.checkpoint} already holds learned QAT ranges; channels are removed before QAT starts "
                              "(shrink a checkpoint saved before QuantizationAwareTraining's begin_step)")
    pruner = channel.pruner
    with without_fake_quant(run.callbacks, run.module):
        before = pruner.size()
        pruner.shrink()
        after = pruner.size()
    checkpoint = dict(run.checkpoint, state_dict=run.module.state_dict())
    for key in ("optimizer_states", "lr_schedulers"):  # shaped for the wider model: export only, no resume
        checkpoint.pop(key, None)
    for key in list(checkpoint.get("callbacks", {})):
        if "ChannelPruning" in key:
            checkpoint["callbacks"][key] = channel.state_dict()
    out = Path(ns.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    print(f"{out}: removed {pruner.channel_ratio()['overall']:.0%} of prunable channels; params {before['params']:,} -> "
          f"{after['params']:,}, MACs {before['macs']:,} -> {after['macs']:,} ({after['macs'] / before['macs']:.2f}x). "
          f"Export it with: sparselite export {out} -c <the run's config.yaml>")


def bench_command(ns: argparse.Namespace) -> None:
    from sparselite.inspect import precision_summary
    from sparselite.runtime.bench import interleaved_benchmark

    results = interleaved_benchmark({m: m for m in ns.models}, accelerator=ns.accelerator, threads=ns.threads,
                                    rounds=ns.rounds, runs_per_round=ns.runs)
    if ns.json:
        print(json.dumps({m: r.to_dict() for m, r in results.items()}, indent=2))
        return
    first = results[ns.models[0]].median_ms
    print(f"{'model':<40} {'median ms':>10} {'p90 ms':>8} {'load ms':>8} {'vs first':>9}  weight ops by precision")
    for name, r in results.items():
        print(f"{name[-40:]:<40} {r.median_ms:>10.3f} {r.p90_ms:>8.3f} {r.load_ms:>8.1f} {r.median_ms / first:>8.2f}x"
              f"  {precision_summary(name)}")
    print(f"({ns.accelerator}, {ns.threads} thread(s), {results[ns.models[0]].runs} runs each, interleaved; "
          "quote ratios from one run, not absolute times)")
    if ns.accelerator == "gpu":
        print("GPU timings on a software Vulkan adapter (lavapipe) are not performance claims.")


def inspect_command(ns: argparse.Namespace) -> None:
    from sparselite.inspect import inspect_tflite

    report = inspect_tflite(ns.model)
    gpu = None
    if ns.gpu:
        from sparselite.runtime.gpu import gpu_compatibility

        gpu = gpu_compatibility(ns.model)
    if ns.json:
        data = report.to_dict()
        if gpu is not None:
            data["gpu"] = gpu
        print(json.dumps(data, indent=2, default=str))
    else:
        print(report.format_table())
        if gpu is not None:
            print(f"GPU (LiteRT accelerator, adapter {gpu.get('adapter')}): "
                  + ("fully accelerated" if gpu.get("fully_accelerated") else
                     f"NOT fully accelerated: {[o.get('op') for o in gpu.get('unsupported_ops', [])]}"))


def demo_command(ns: argparse.Namespace) -> None:
    from sparselite.demo import run_demo

    run_demo(out_dir=Path(ns.out), retrain_baseline=ns.retrain_baseline, channels=ns.channels)


def _optional_count(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _precision(text: str) -> str | dict[str, str]:
    """'dynamic_int8', or a mapping written 'default=dynamic_int8,head=fp32'."""
    if "=" not in text:
        return text
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(pair) != 2 for pair in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: write a mapping as regex=precision,...,default=precision")
    return dict(pairs)


# Help for each ExportOptions field; the flag is the field's name with '-' for '_'.
EXPORT_OPTION_HELP = {
    "io_dtype": "the model's input/output type",
    "sparse": "store pruned weights in TFLite's sparse format where that saves bytes (--no-sparse: dense)",
    "verify_batches": "validation batches the file is checked on; 'none' skips the parity check",
    "calibration_batches": "further validation batches that calibrate ranges QAT did not learn",
    "min_agreement": "top-1 agreement with the torch model below which the export fails",
    "gpu_check": "add a GPU compatibility report",
    "require_gpu": "fail unless every op runs on the GPU accelerator",
    "float_fallback": "keep ops with no int8 TFLite kernel in float (mixed precision; listed in the report); "
                      "'--float-fallback xnnpack' also the modules whose int8 ops XNNPACK does not run (LayerNorm, attention)",
    "precision": "int8 (the fully int8 file), dynamic_int8, fp16, fp32, auto (per layer, measured: prints its "
                 "choice), or per layer: 'default=dynamic_int8,head=fp32' (module-name regexes)",
    "max_accuracy_drop": "--precision auto: top-1 points the file may lose against the float model",
}


def _add_export_options(parser: argparse.ArgumentParser) -> None:
    """One flag per ExportOptions field, by the same name, with the same default."""
    from sparselite.export.options import IO_DTYPES, ExportOptions

    defaults = ExportOptions()
    kinds = {
        "io_dtype": {"choices": IO_DTYPES},
        "sparse": {"action": argparse.BooleanOptionalAction},
        "verify_batches": {"type": _optional_count},
        "calibration_batches": {"type": int},
        "min_agreement": {"type": float},
        "gpu_check": {"action": "store_true"},
        "require_gpu": {"action": "store_true"},
        "float_fallback": {"nargs": "?", "const": True, "choices": ("xnnpack",)},
        "precision": {"type": _precision},
        "max_accuracy_drop": {"type": float},
    }
    for name in ExportOptions.names():
        parser.add_argument(f"--{name.replace('_', '-')}", default=getattr(defaults, name), help=EXPORT_OPTION_HELP[name],
                            **kinds[name])



def add_export_parser(sub) -> None:
    """``sparselite export``."""
    p = sub.add_parser("export", help="export a checkpoint to a .tflite (fully int8 by default)")
    p.add_argument("checkpoint")
    p.add_argument("-c", "--config", action="append", help="run config(s); default: the config.yaml LightningCLI saved next to the checkpoint")
    p.add_argument("-o", "--output", default="model.tflite")
    _add_export_options(p)
    p.set_defaults(func=export_command)


def add_shrink_parser(sub) -> None:
    """``sparselite shrink``."""
    p = sub.add_parser("shrink", help="remove the channels a ChannelPruning run masked; write a smaller checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("-c", "--config", action="append", help="run config(s); default: the config.yaml LightningCLI saved next to the checkpoint")
    p.add_argument("-o", "--output", required=True, help="the shrunk checkpoint (.ckpt); for export, not for resuming")
    p.set_defaults(func=shrink_command)


def add_bench_parser(sub) -> None:
    """``sparselite bench``."""
    p = sub.add_parser("bench", help="latency of one or more .tflite files, interleaved")
    p.add_argument("models", nargs="+")
    p.add_argument("--accelerator", choices=("xnnpack", "reference", "gpu"), default="xnnpack")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--runs", type=int, default=30, help="timed runs per model per round")
    p.set_defaults(func=bench_command)


def add_inspect_parser(sub) -> None:
    """``sparselite inspect``."""
    p = sub.add_parser("inspect", help="per-tensor sparsity, encoding and bytes of a .tflite")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.add_argument("--gpu", action="store_true", help="also compile GPU-only and list unsupported ops")
    p.set_defaults(func=inspect_command)


def add_demo_parser(sub) -> None:
    """``sparselite demo``."""
    p = sub.add_parser("demo", help="the default demo: dense baseline vs 80%% GMP + QAT distilled from it, exported and measured")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--retrain-baseline", action="store_true")
    p.add_argument("--channels", action="store_true",
                   help="also train recipes/channels50_qat_distill_export.yaml and add the channel-pruned int8 file to the table")
    p.set_defaults(func=demo_command)
