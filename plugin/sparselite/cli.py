"""``sparselite fit|validate|test|export|shrink|eval|bench|inspect|demo``.

fit/validate/test are LightningCLI: ``sparselite fit -c configs/<model+data>.yaml -c recipes/<compression>.yaml``.
Bad input of any kind ends in one line on stderr and exit code 2, before training starts.
-v/--verbose (anywhere on the line) shows the libraries' own log lines, which are hidden by default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparselite.errors import SparseliteError

LIGHTNING_COMMANDS = ("fit", "validate", "test")
# Recipe keys that were renamed (one name per option across the callbacks): old -> new.
RENAMED_KEYS = {"start_step": "begin_step"}
VERBOSE_FLAGS = ("-v", "--verbose")


def _fail(message: str) -> None:
    print(f"sparselite: error: {message}", file=sys.stderr)
    sys.exit(2)


def _lightning(args: list[str]) -> None:
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from sparselite.interrupts import Interrupted
    from sparselite.lightning_cli import build_lightning_cli

    try:
        build_lightning_cli(args)
    except Interrupted as stop:
        print(f"sparselite: interrupted by {stop}; resume with --ckpt_path {stop.checkpoint}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except ArgumentError as err:
        _fail(_explain(err))
    except MisconfigurationException as err:
        # Lightning's own check of a Trainer argument (max_steps: -5, devices: 0, accelerator: gpu
        # without one), raised while the Trainer is built, before any training.
        _fail(f"trainer: {_first_line(err)}")
    except ValueError as err:
        # jsonargparse wraps a SparseliteError raised in a class's __init__ (instantiation) in a ValueError.
        if _sparselite_cause(err) is None:
            raise
        _fail(_explain(err))


def _causes(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _sparselite_cause(err: BaseException) -> SparseliteError | None:
    return next((e for e in _causes(err) if isinstance(e, SparseliteError)), None)


def _explain(err: BaseException) -> str:
    """One line that says what is wrong: our own message if a SparseliteError is behind ``err``, else the
    innermost jsonargparse message that still names the key or class (e.g. 'Parser key "final_sparsity":
    Expected a <class 'float'>. Got value: abc'), joined onto one line."""
    if (cause := _sparselite_cause(err)) is not None:
        return str(cause)
    for old, new in RENAMED_KEYS.items():
        if f'"{old}"' in str(err) or f"'{old}'" in str(err):
            return f"{old} is now named {new} (every scheduled callback takes begin_step/end_step); rename it in the recipe"
    for inner in reversed(_causes(err)):
        text = str(inner)
        if text.startswith(("Problem with given class_path", "Parser key")) and "Does not validate against any" not in text:
            return " ".join(line.strip() for line in text.splitlines() if line.strip())[:400]
    return _first_line(err)


def _first_line(err: BaseException) -> str:
    """jsonargparse nests the real cause under a multi-line preamble; keep the most specific line."""
    lines = [line.strip(" -") for line in str(err).splitlines() if line.strip(" -")]
    specific = [line for line in lines if any(k in line for k in ("SparseliteError", "not expected", "Key ", "does not", "must", "is not", "unrecognized"))]
    return (specific[-1] if specific else lines[0] if lines else type(err).__name__)[:400]


def export_command(ns: argparse.Namespace) -> None:
    """Rebuild the run from its config, restore the checkpoint (masks, ranges), export."""
    from sparselite.export.destination import check_destination
    from sparselite.export.from_loader import export_from_loader
    from sparselite.export.options import ExportOptions
    from sparselite.export.report import report_path
    from sparselite.lightning_cli import restore_run
    from sparselite.pruning.channel_callback import ChannelPruning

    options = ExportOptions(**{name: getattr(ns, name) for name in ExportOptions.names()})
    check_destination(ns.output, report_path(ns.output))  # before the checkpoint is loaded and the export runs
    run = restore_run(ns.checkpoint, ns.config)
    run.datamodule.setup("validate")
    channel = run.callback(ChannelPruning)
    report = export_from_loader(run.module, run.datamodule.val_dataloader(), ns.output, options,
                                channel_pruner=None if channel is None else channel.pruner)
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


def eval_command(ns: argparse.Namespace) -> None:
    """Top-1, top-5 and the confusion matrix of a .tflite on Fashion-MNIST (default), a config's
    datamodule (-c), or a folder of images (--images, one subfolder per class)."""
    import itertools

    import numpy as np

    from sparselite import evaluation

    folder = evaluation.scan_image_folder(ns.images) if ns.images else None  # bad paths before anything loads
    datamodule = _eval_datamodule(ns.config) if ns.config else None
    from sparselite.runtime.litert import LiteRTModel

    model = LiteRTModel(ns.model, accelerator=ns.accelerator, threads=ns.threads, gpu_precision=ns.gpu_precision)
    num_classes = evaluation.output_classes(model.output_shape)
    names = None
    if folder is not None:
        source = f"--images {folder.root}"
        channels, height, width, _ = evaluation.image_input_layout(model.input_shape, source)
        if len(folder.classes) > num_classes:
            raise SparseliteError(f"{source} has {len(folder.classes)} class folders but the model has {num_classes} "
                                  "outputs; give at most one folder per class the model knows")
        config_mean, config_std = evaluation.config_normalization(datamodule) if datamodule is not None else (None, None)
        mean = evaluation.per_channel(ns.mean or _broadcast(config_mean, channels), channels, "mean", 0.0)
        std = evaluation.per_channel(ns.std or _broadcast(config_std, channels), channels, "std", 1.0)
        batches = evaluation.image_folder_batches(folder, channels, (height, width), mean, std, limit=ns.limit)
        names, what = folder.classes, f"images from {folder.root}"
    elif datamodule is not None:
        loader, split = evaluation.config_loader(datamodule)
        source = f"the config's {split} data"
        batches = ((np.asarray(x), np.asarray(y)) for x, y, *_ in loader)
        if ns.limit:
            batches = _limited(batches, ns.limit)
        what = f"{split} examples of {type(datamodule).__name__}"
    else:
        from sparselite.data.fashion_mnist import load_split, resize_images

        images, labels = load_split(ns.split, ns.data)
        if ns.limit:
            images, labels = images[: ns.limit], labels[: ns.limit]
        shape = tuple(model.input_shape[1:])
        if len(shape) == 3 and shape != tuple(images.shape[1:]) and shape[0] in (1, 3):  # trained at another size
            images = resize_images(images, shape[-1], shape[0])
        source = f"Fashion-MNIST ({ns.split})"
        batches = ((images[i : i + 256].numpy(), labels[i : i + 256].numpy()) for i in range(0, len(images), 256))
        what = f"Fashion-MNIST {ns.split} images"
    first = next(iter(batches), None)  # the first batch is checked against the model before the rest runs
    if first is None:
        raise SparseliteError(f"{source} gave no examples to evaluate")
    evaluation.fit_to_model(np.asarray(first[0], dtype=np.float32), model.input_shape, source)
    scores = evaluation.score(model, itertools.chain([first], batches), num_classes, source)
    result = scores.to_dict(names)
    result.update(model=str(ns.model), accelerator=ns.accelerator, source=source,
                  split=ns.split if folder is None and datamodule is None else None)
    if ns.json:
        print(json.dumps(result))
        return
    print(f"{ns.model} on {ns.accelerator}: top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%} "
          f"over {result['examples']} {what}")
    print(scores.format_confusion(names))


def _broadcast(values: list[float] | None, channels: int) -> list[float] | None:
    """A config's single mean/std value serves every channel."""
    return values * channels if values is not None and len(values) == 1 else values


def _limited(batches, limit: int):
    left = limit
    for x, y in batches:
        if left <= 0:
            return
        yield x[:left], y[:left]
        left -= len(y)


def _eval_datamodule(configs: list[str]):
    """The configs' datamodule; config errors are one line, as in ``sparselite fit``."""
    from jsonargparse import ArgumentError

    from sparselite import evaluation

    try:
        return evaluation.config_datamodule(configs)
    except ArgumentError as err:
        raise SparseliteError(_explain(err)) from None
    except ValueError as err:
        if _sparselite_cause(err) is None:
            raise
        raise SparseliteError(_explain(err)) from None


def bench_command(ns: argparse.Namespace) -> None:
    from sparselite.runtime.bench import interleaved_benchmark

    results = interleaved_benchmark({m: m for m in ns.models}, accelerator=ns.accelerator, threads=ns.threads,
                                    rounds=ns.rounds, runs_per_round=ns.runs)
    if ns.json:
        print(json.dumps({m: r.to_dict() for m, r in results.items()}, indent=2))
        return
    first = results[ns.models[0]].median_ms
    print(f"{'model':<40} {'median ms':>10} {'p90 ms':>8} {'load ms':>8} {'vs first':>9}")
    for name, r in results.items():
        print(f"{name[-40:]:<40} {r.median_ms:>10.3f} {r.p90_ms:>8.3f} {r.load_ms:>8.1f} {r.median_ms / first:>8.2f}x")
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


def report_command(ns: argparse.Namespace) -> None:
    """The HTML page of a saved export report (what every export also writes next to its file)."""
    from sparselite.export import html_report as pages
    from sparselite.export.report import report_path

    source = Path(ns.report)
    if source.suffix == ".tflite":  # the model itself: its report is next to it
        source = report_path(source)
    data = pages.load_report_json(source)
    out = Path(ns.output) if ns.output else source.with_suffix(".html")
    if out.suffix.lower() not in (".html", ".htm"):
        raise SparseliteError(f"output {out} must end in .html")
    if out.is_dir():
        raise SparseliteError(f"output {out} is a folder; give a file name such as {out / 'model.html'}")
    if out.exists() and not pages.is_ours(out):
        raise SparseliteError(f"{out} exists and is not a sparselite report page; refusing to overwrite it")
    model, model_note = pages.model_file_for(data, source)
    metrics_csv = Path(ns.metrics) if ns.metrics else pages.find_run_metrics(source)
    if ns.metrics and not metrics_csv.is_file():
        raise SparseliteError(f"--metrics {metrics_csv} does not exist")
    op_latency, timing_note = None, "--no-timing" if ns.no_timing else model_note
    if model is not None and not ns.no_timing:
        op_latency, timing_note = pages.timed_op_types(model, ns.timing_budget)
    try:
        page = pages.build_html(data, model_file=model, model_note=model_note, op_latency=op_latency,
                                op_latency_note=timing_note, source=str(source),
                                metrics=pages.read_run_metrics(metrics_csv) if metrics_csv else None)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as err:  # a hand-edited or foreign JSON
        raise SparseliteError(f"{source} is not a valid sparselite export report: {type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else ''}") from None
    pages.write_html(out, page)
    print(f"{out}: report page for {data['path']}" + (f" (run metrics: {metrics_csv})" if metrics_csv else ""))


def sensitivity_command(ns: argparse.Namespace) -> None:
    """Prune each layer alone over a grid, measure, and write a recipe of per-layer targets (sensitivity_run.py)."""
    from jsonargparse import ArgumentError

    from sparselite.pruning.sensitivity import StopOnSignal, SweepInterrupted, parse_grid

    out = Path(ns.out)
    try:
        with StopOnSignal():
            from sparselite.sensitivity_run import SensitivitySettings, run_sensitivity

            if ns.target is not None and not 0.0 <= ns.target < 1.0:
                raise SparseliteError(f"--target {ns.target} must be a sparsity in [0, 1)")
            for name in ("pretrain_steps", "fine_tune_steps", "val_batches"):
                if getattr(ns, name) is not None and getattr(ns, name) < 0:
                    raise SparseliteError(f"--{name.replace('_', '-')} {getattr(ns, name)} must be >= 0")
            run_sensitivity(SensitivitySettings(
                configs=ns.config, out=out, target=ns.target, grid=parse_grid(ns.grid), checkpoint=ns.checkpoint,
                pretrain_steps=ns.pretrain_steps, fine_tune_steps=ns.fine_tune_steps, fine_tune_lr=ns.fine_tune_lr,
                val_batches=ns.val_batches or None, recipe=Path(ns.recipe) if ns.recipe else None))
    except SweepInterrupted as stop:
        print(f"sparselite: interrupted by {stop}; points measured so far are kept in {out / 'sensitivity.json'}: "
              "the same command goes on from there", file=sys.stderr)
        sys.exit(stop.exit_code)
    except ArgumentError as err:
        _fail(_explain(err))
    except ValueError as err:
        if _sparselite_cause(err) is None:
            raise
        _fail(_explain(err))


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
    "precision": "int8 (the fully int8 file), dynamic_int8, fp16, fp32, or per layer: 'default=dynamic_int8,head=fp32' "
                 "(module-name regexes)",
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
    }
    for name in ExportOptions.names():
        parser.add_argument(f"--{name.replace('_', '-')}", default=getattr(defaults, name), help=EXPORT_OPTION_HELP[name],
                            **kinds[name])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparselite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="show the libraries' log lines (also after the command)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name}: -c configs/X.yaml -c recipes/Y.yaml", add_help=False)

    p = sub.add_parser("export", help="export a checkpoint to a .tflite (fully int8 by default)")
    p.add_argument("checkpoint")
    p.add_argument("-c", "--config", action="append", help="run config(s); default: the config.yaml LightningCLI saved next to the checkpoint")
    p.add_argument("-o", "--output", default="model.tflite")
    _add_export_options(p)
    p.set_defaults(func=export_command)

    p = sub.add_parser("shrink", help="remove the channels a ChannelPruning run masked; write a smaller checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("-c", "--config", action="append", help="run config(s); default: the config.yaml LightningCLI saved next to the checkpoint")
    p.add_argument("-o", "--output", required=True, help="the shrunk checkpoint (.ckpt); for export, not for resuming")
    p.set_defaults(func=shrink_command)

    for name, func, help_text in (("eval", eval_command, "top-1, top-5 and confusion matrix of a .tflite on "
                                                         "Fashion-MNIST, a config's data (-c) or an image folder"),
                                  ("bench", bench_command, "latency of one or more .tflite files, interleaved")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model" if name == "eval" else "models", nargs=None if name == "eval" else "+")
        p.add_argument("--accelerator", choices=("xnnpack", "reference", "gpu"), default="xnnpack")
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
        if name == "eval":
            p.add_argument("-c", "--config", action="append", help="score on this training config's datamodule: its "
                           "test set, or its validation set if it has none")
            p.add_argument("--images", default=None, help="score on a folder with one subfolder of PNG/JPEG images "
                           "per class (sorted names = class indices)")
            p.add_argument("--mean", type=float, nargs="+", default=None,
                           help="--images: per-channel mean after scaling pixels to [0, 1] (default: the config's, else 0)")
            p.add_argument("--std", type=float, nargs="+", default=None,
                           help="--images: per-channel std (default: the config's, else 1)")
            p.add_argument("--split", choices=("test", "train"), default="test")
            p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: $SPARSELITE_DATA or the Debian path)")
            p.add_argument("--limit", type=int, default=0)
            p.add_argument("--gpu-precision", choices=("fp16", "fp32"), default="fp16")
        else:
            p.add_argument("--rounds", type=int, default=10)
            p.add_argument("--runs", type=int, default=30, help="timed runs per model per round")

    p = sub.add_parser("inspect", help="per-tensor sparsity, encoding and bytes of a .tflite")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.add_argument("--gpu", action="store_true", help="also compile GPU-only and list unsupported ops")
    p.set_defaults(func=inspect_command)

    p = sub.add_parser("report", help="an HTML page (plots inline, no network) of a saved export report")
    p.add_argument("report", help="the model.json an export wrote (or the .tflite next to it)")
    p.add_argument("-o", "--output", default=None, help="the page (default: the report's name with .html)")
    p.add_argument("--metrics", default=None, help="the run's metrics.csv (default: the newest Lightning CSV log next to the report)")
    p.add_argument("--no-timing", action="store_true", help="do not time each op type of the .tflite on XNNPACK")
    p.add_argument("--timing-budget", type=float, default=30.0, help="seconds the op-type timing may take")
    p.set_defaults(func=report_command)

    p = sub.add_parser("sensitivity", help="prune each layer alone over a grid; write a recipe of per-layer targets")
    p.add_argument("-c", "--config", action="append", required=True, help="the run's configs: model+data, and a recipe with GradualPruning")
    p.add_argument("--target", type=float, default=None, help="overall sparsity to reach (default: the recipe's final_sparsity)")
    p.add_argument("--grid", default=",".join(f"{s:g}" for s in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)), help="sparsities to measure, comma-separated")
    p.add_argument("--checkpoint", default=None, help="a dense checkpoint of this config to measure (default: train one first)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="dense training steps without --checkpoint (default: trainer.max_steps)")
    p.add_argument("--fine-tune-steps", type=int, default=0, help="training steps after pruning each point (0: none)")
    p.add_argument("--fine-tune-lr", type=float, default=1e-4)
    p.add_argument("--val-batches", type=int, default=0, help="validation batches per point (0: all)")
    p.add_argument("-o", "--out", default="runs/sensitivity", help="folder for the table, plot, measured points and recipe")
    p.add_argument("--recipe", default=None, help="where the recipe goes (default: OUT/recipe.yaml)")
    p.set_defaults(func=sensitivity_command)

    p = sub.add_parser("demo", help="the default demo: dense baseline vs 80%% GMP + QAT, exported and measured")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--retrain-baseline", action="store_true")
    p.add_argument("--channels", action="store_true",
                   help="also train recipes/channels50_qat_export.yaml and add the channel-pruned int8 file to the table")
    p.set_defaults(func=demo_command)
    return parser


def main(argv: list[str] | None = None) -> None:
    from sparselite.stopping import Stopped, raise_on_sigterm

    raise_on_sigterm()  # SIGTERM anywhere below: one line and exit 143, like Ctrl-C's 130
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(arg in VERBOSE_FLAGS for arg in argv)
    argv = [arg for arg in argv if arg not in VERBOSE_FLAGS]
    native_filter = None
    if not verbose:
        from sparselite.quiet import NativeStderrFilter, quiet_libraries

        quiet_libraries()  # before anything heavy is imported
        native_filter = NativeStderrFilter()
        native_filter.start()
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            _lightning(argv)
            return
        ns = _parser().parse_args(argv)
        ns.func(ns)
    except SparseliteError as err:
        _fail(str(err))
    except Stopped as stop:  # a signal: in training (Interrupted, with its checkpoint) or outside (Terminated)
        print(f"sparselite: interrupted by {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:  # Ctrl+C outside training (imports, export): the shell's code, no traceback
        print("sparselite: interrupted by SIGINT", file=sys.stderr)
        sys.exit(130)
    finally:
        if native_filter is not None:
            native_filter.stop()


if __name__ == "__main__":
    main()
