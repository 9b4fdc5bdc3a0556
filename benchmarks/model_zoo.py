"""Bring-your-own-model benchmark: torchvision's classification families (and sequence models) through
the real recipe, exported by sparselite and by litert-torch's own PTQ, side by side.

For each model (``weights=None``, 10 classes, Fashion-MNIST resized to 64x64 and repeated to RGB; the
Conv1d and GRU models read the 28x28 rows):
  1. trains ``--steps`` steps in a Lightning ``Trainer`` with the real callbacks: ``GradualPruning`` to
     50% and ``QuantizationAwareTraining``, scheduled as recipes/gmp80_qat_export.yaml, scaled to the
     step budget (BatchNorm's momentum too; the ranges' moving-average constant follows the QAT window);
  2. exports with ``sparselite.export_tflite`` (``float_fallback="xnnpack"``: ops with no int8 kernel,
     and modules whose int8 ops XNNPACK does not delegate, stay float; a CNN keeps none), parity on
     ``--verify`` held-out test images (and the same file on TFLite's builtin kernels: the noise
     floor), the export's own peak RSS, and the fp32 file;
  3. exports the same trained float weights with litert-torch's own PTQ (its ``PT2EQuantizer``,
     calibrated on 256 training images), as a user of litert-torch alone would;
  4. measures top-1 of each file on ``--eval`` test images and times fp32 / sparselite int8 / litert
     PTQ int8 on XNNPACK, 1 thread, interleaved in one run (medians; ratios are what to read).

Run from the repo root (needs the test extra, which has torchvision):
    .venv/bin/python -m benchmarks.model_zoo                                  # all models, ~40 min on 2 cores
    .venv/bin/python -m benchmarks.model_zoo --models resnet18 mobilenet_v2 --steps 100
    .venv/bin/python -m benchmarks.model_zoo --models densenet121 vgg11_bn --steps 30 --txt other.txt --json other.json
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

import sparselite  # noqa: F401  (before torchvision: see sparselite/compat/torchvision.py)
from benchmarks._common import (
    environment, environment_line, fmt, peak_rss_bytes, quiet_logs, reset_peak_rss, scale_batchnorm_momentum, table, without_machine_paths, write_json,
)

RESULTS = Path(__file__).parent / "results"
RECIPE = Path(__file__).parent.parent / "recipes" / "gmp80_qat_export.yaml"
RECIPE_STEPS = 1200  # configs/fmnist_mobilenet.yaml's trainer.max_steps, which the recipe is written for


def build_model(name: str, library: str = "torchvision") -> tuple[torch.nn.Module, tuple[int, int, int]]:
    """The model and the [C, H, W] it reads."""
    from sparselite.models.sequence import GRUClassifier, KeywordSpotter

    if library == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10), (3, 64, 64)

    if name == "conv1d_kws":
        return KeywordSpotter(), (1, 28, 28)
    if name == "gru":
        return GRUClassifier(), (1, 28, 28)
    import torchvision.models as tvm

    if name == "vit_tiny":
        return tvm.VisionTransformer(image_size=64, patch_size=8, num_layers=2, num_heads=4, hidden_dim=96,
                                     mlp_dim=192, num_classes=10), (3, 64, 64)
    return getattr(tvm, name)(weights=None, num_classes=10), (3, 64, 64)


def torchvision_classifiers() -> list[str]:
    import torchvision.models as tvm

    return tvm.list_models(module=tvm)


# timm's mobile families (random init; ``timm.list_models()`` names any other).
TIMM_MODELS = ["mobilenetv4_conv_small", "mobilenetv3_large_100", "efficientnet_b0", "tf_efficientnet_lite0", "mixnet_s",
               "ghostnet_100", "repvgg_a0", "resnet18d"]
MODELS = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x1_0", "squeezenet1_1",
          "regnet_x_400mf", "mnasnet1_0", "vit_tiny", "conv1d_kws", "gru", "mobilenet_v3_large", "resnet50"]


def schedule(steps: int) -> dict[str, int]:
    """The demo recipe's pruning and QAT steps, scaled from its max_steps to ``steps``."""
    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c["init_args"] for c in recipe["trainer"]["callbacks"]}
    scaled = {f"prune_{k}": callbacks["GradualPruning"][k] for k in ("begin_step", "end_step", "frequency")}
    scaled |= {f"qat_{k}": callbacks["QuantizationAwareTraining"][k] for k in ("begin_step", "freeze_step")}
    return {k: max(1, round(v * steps / RECIPE_STEPS)) for k, v in scaled.items()}


def train(name: str, steps: int, batch_size: int, library: str = "torchvision"):
    import lightning.pytorch as pl

    from sparselite import GradualPruning, QuantizationAwareTraining
    from sparselite.data.fashion_mnist import FashionMNISTDataModule
    from sparselite.models.classifier import ImageClassifier

    torch.manual_seed(0)
    model, shape = build_model(name, library)
    scale_batchnorm_momentum(model)  # MobileNetV3's and EfficientNet's 0.01 is made for ImageNet-length runs
    module = ImageClassifier(model, lr=3e-3, input_shape=shape)
    data = FashionMNISTDataModule(batch_size=batch_size, image_size=shape[-1], channels=shape[0])
    s = schedule(steps)
    callbacks = [
        # Small heads (the GRU's) are pruned too: min_params low enough that every model has a layer.
        GradualPruning(final_sparsity=0.5, begin_step=s["prune_begin_step"], end_step=s["prune_end_step"],
                       frequency=s["prune_frequency"], min_params=256),
        # The ranges' moving-average constant follows the QAT window by default (3 / its steps).
        QuantizationAwareTraining(begin_step=s["qat_begin_step"], freeze_step=s["qat_freeze_step"]),
    ]
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, data)
    return module, data, shape, time.perf_counter() - start


def litert_ptq(float_model: torch.nn.Module, example: torch.Tensor, calibration: torch.Tensor, path: Path) -> float:
    """litert-torch's own post-training quantization, as its docs show it. Returns seconds."""
    import litert_torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    start = time.perf_counter()
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(float_model, (example,)).module(), quantizer)
    with torch.no_grad():
        for image in calibration:
            prepared(image[None])
    converted = convert_pt2e(prepared, fold_quantize=False)
    edge = litert_torch.convert(converted, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
    path.write_bytes(edge.model_content())
    return time.perf_counter() - start


def file_islands(path: Path) -> list:
    from sparselite.tflite.flatbuffer import read_model
    from sparselite.export.names import use_module_names
    from sparselite.export.islands import float_islands

    model = read_model(path)
    use_module_names(model)
    return float_islands(model)


def file_accuracy(path: Path, images: torch.Tensor, labels: torch.Tensor) -> float:
    from sparselite.runtime.litert import LiteRTModel

    runtime = LiteRTModel(path, accelerator="xnnpack", threads=1)
    correct = 0
    for start in range(0, len(images), 100):
        correct += int((runtime(images[start : start + 100].numpy()).argmax(1) == labels[start : start + 100].numpy()).sum())
    return correct / len(images)


def run_model(name: str, args: argparse.Namespace, out_dir: Path) -> dict:
    from sparselite.data.fashion_mnist import load_split, resize_images
    from sparselite.export.parity import measure_noise_floor
    from sparselite.export.conversion import export_float_tflite, float_model_for_export
    from sparselite.export.tflite import export_tflite
    from sparselite.runtime.bench import interleaved_benchmark

    result: dict = {"model": name}
    module, data, shape, train_s = train(name, args.steps, args.batch_size, args.library)
    result["train_s"] = train_s
    test_x, test_y = load_split("test")
    train_x, _ = load_split("train")
    test_x = resize_images(test_x[: max(args.eval, args.verify)], shape[-1], shape[0])
    test_y = test_y[: len(test_x)]
    calibration = resize_images(train_x[:256], shape[-1], shape[0])
    example = test_x[:1]

    int8, fp32, ptq = out_dir / f"{name}_int8.tflite", out_dir / f"{name}_fp32.tflite", out_dir / f"{name}_ptq.tflite"
    reset_peak_rss()  # the export's own peak, not training's
    start = time.perf_counter()
    try:
        report = export_tflite(module, example, int8, calibration_data=[calibration], verify_data=[test_x[: args.verify]],
                               min_agreement=0.0, float_fallback="xnnpack")
    except Exception as err:  # the table reports it; the other models still run
        result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        return result
    result["export_s"] = time.perf_counter() - start
    result["export_peak_rss_gb"] = peak_rss_bytes() / 1e9
    measure_noise_floor(report.parity, int8, [test_x[: args.verify]])  # what the gate compares with, always
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    result["islands"] = [(i.op, i.count) for i in report.float_islands]
    result["island_latency_shares"] = {i.op: i.latency_share for i in report.float_islands}
    result["islands_latency_share"] = report.float_islands_latency_share  # all of them, with their borders
    result["ranges"] = {"learned": report.ranges_learned, "derived": report.ranges_derived, "fixed": report.ranges_fixed,
                        "calibrated": report.ranges_calibrated, "calibrated_why": report.calibrated_ranges}
    result["parity"] = {"agreement": report.parity.top1_agreement, "ties": report.parity.ties_excluded,
                        "max_lsb": report.parity.max_logit_diff_lsb, "degenerate": report.parity.degenerate_reference,
                        "kernel_agreement": report.parity.kernel_agreement, "kernel_max_lsb": report.parity.kernel_max_lsb}
    result["int8_bytes"] = report.file_bytes
    export_float_tflite(module, example, fp32)
    result["fp32_bytes"] = fp32.stat().st_size
    float_model = float_model_for_export(module)
    with torch.no_grad():
        result["torch_fp32_acc"] = float((float_model(test_x[: args.eval]).argmax(1) == test_y[: args.eval]).float().mean())
    try:
        result["ptq_export_s"] = litert_ptq(copy.deepcopy(float_model), example, calibration, ptq)
        result["ptq_islands"] = [(i.op, i.count) for i in file_islands(ptq)]
        result["ptq_bytes"] = ptq.stat().st_size
    except Exception as err:
        result["ptq_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    for key, path in (("fp32", fp32), ("int8", int8), ("ptq", ptq)):
        if path.exists():
            result[f"{key}_acc"] = file_accuracy(path, test_x[: args.eval], test_y[: args.eval])
    paths = {k: str(p) for k, p in (("fp32", fp32), ("int8", int8), ("ptq", ptq)) if p.exists()}
    latency = interleaved_benchmark(paths, threads=1, rounds=args.rounds, runs_per_round=args.runs)
    result["latency_ms"] = {k: v.median_ms for k, v in latency.items()}
    return result


def islands_text(islands) -> str:
    if not islands:
        return "0"
    return f"{sum(c for _, c in islands)} ({','.join(op for op, _ in islands)})"


def print_table(results: list[dict]) -> str:
    headers = ["model", "export", "islands", "ranges L/D/F/C", "agree", "ties", "LSB", "floor agree", "floor LSB", "acc fp32",
               "acc int8", "int8/fp32", "int8 KiB", "export s", "export GB", "PTQ islands", "PTQ acc", "PTQ/fp32"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["model"], r["error"]] + ["-"] * (len(headers) - 2))
            continue
        lat, ranges = r["latency_ms"], r["ranges"]
        rows.append([
            r["model"], "ok", islands_text(r["islands"]),
            f"{ranges['learned']}/{ranges['derived']}/{ranges['fixed']}/{ranges['calibrated']}",
            f"{r['parity']['agreement']:.2%}", str(r["parity"]["ties"]), fmt(r["parity"]["max_lsb"], ".0f"),
            fmt(r["parity"].get("kernel_agreement"), ".2%"), fmt(r["parity"].get("kernel_max_lsb"), ".0f"),
            f"{r.get('fp32_acc', 0):.1%}", f"{r.get('int8_acc', 0):.1%}", f"{lat['int8'] / lat['fp32']:.2f}x",
            f"{r['int8_bytes'] / 1024:.0f}", f"{r['export_s']:.0f}", fmt(r.get("export_peak_rss_gb"), ".2f"),
            islands_text(r["ptq_islands"]) if "ptq_islands" in r else r.get("ptq_error", "-")[:30],
            f"{r['ptq_acc']:.1%}" if "ptq_acc" in r else "-",
            f"{lat['ptq'] / lat['fp32']:.2f}x" if "ptq" in lat else "-",
        ])
    return table(headers, rows, left=(0, 1, 2, 15))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", choices=("torchvision", "timm"), default="torchvision",
                        help="where the models come from (timm: its default models are " + ", ".join(TIMM_MODELS) + ")")
    parser.add_argument("--models", nargs="+", metavar="MODEL",
                        help=f"from {', '.join(MODELS)}, or any other torchvision classification model "
                             "(its default constructor, weights=None, 10 classes: how the generality check runs); "
                             "with --library timm, any name of timm.list_models()")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--verify", type=int, default=512, help="held-out test images for the parity gate")
    parser.add_argument("--eval", type=int, default=1000, help="test images for the accuracy columns")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training (1 on a shared machine)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved latency rounds (fp32, int8, PTQ)")
    parser.add_argument("--runs", type=int, default=20, help="timed calls per file per round")
    parser.add_argument("--json", help="default: results/model_zoo.json (model_zoo_timm.json with --library timm)")
    parser.add_argument("--txt", help="default: results/model_zoo.txt (model_zoo_timm.txt with --library timm)")
    parser.add_argument("--from-json", help="print the table of a saved run instead of running")
    args = parser.parse_args(argv)
    suffix = "_timm" if args.library == "timm" else ""
    args.json = args.json or str(RESULTS / f"model_zoo{suffix}.json")
    args.txt = args.txt or str(RESULTS / f"model_zoo{suffix}.txt")
    if args.library == "timm":
        import timm

        args.models = args.models or TIMM_MODELS
        known = set(timm.list_models())
        unknown = [name for name in args.models if name not in known]
        where = "timm.list_models()"
    else:
        args.models = args.models or MODELS
        unknown = [name for name in args.models if name not in MODELS and name not in torchvision_classifiers()]
        where = f"{', '.join(MODELS)} or torchvision.models.list_models()"
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: pick from {where}")
    if args.from_json:
        print(print_table(json.loads(Path(args.from_json).read_text())["results"]))
        return
    quiet_logs()
    torch.set_num_threads(args.threads)
    env = environment()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print(f"[model_zoo] {name}: training {args.steps} steps", file=sys.stderr, flush=True)
            results.append(run_model(name, args, Path(tmp)))
            # Written after every model, so a long run that is stopped keeps what it measured.
            text = "\n".join([environment_line(env), f"# {args.steps} steps, batch {args.batch_size}, parity on "
                              f"{args.verify} test images, accuracy on {args.eval}; latency: {args.rounds} interleaved rounds of "
                              f"{args.runs} calls per file, medians", print_table(results)])
            if args.txt:
                Path(args.txt).write_text(without_machine_paths(text + "\n"))
            write_json(args.json, {"environment": env, "args": vars(args), "results": results})
            print(print_table(results[-1:]), file=sys.stderr, flush=True)
    print(text)


if __name__ == "__main__":
    main()
