"""Each precision of the exported file, per model: size, XNNPACK latency against the fp32 file, and how
well the file agrees with the float model.

For each model (random weights unless --train-steps: latency and size do not depend on the values; with
--train-steps N, N Adam steps on Fashion-MNIST first, so that agreement and accuracy mean something):
  - fp32, fp16 and dynamic_int8 files from ``export_tflite(precision=...)`` (a model with depthwise convs
    gets ``{"default": "dynamic_int8", <depthwise layers>: "fp32"}``: XNNPACK has no dynamic-range
    depthwise kernel);
  - the fully int8 file (``precision="int8"``, post-training calibration on 256 images;
    ``float_fallback="xnnpack"`` so that attention and recurrent cells may stay float where XNNPACK has
    no int8 kernel);
  - ``precision="auto"`` (its accuracy budget on 256 held-out images and their labels, the same
    calibration batch, so it may choose the fully int8 file); the note says what it chose;
  - ai-edge-quantizer's ``dynamic_wi8_afp32`` and fp16 weight-only recipes on the same fp32 file, for
    comparison;
  - with --qat-steps N (after --train-steps): "auto+qat", N more steps of QAT simulating auto's choice
    and the export that follows it, against "aeq_dynamic_int8+more", N more float steps and
    ai-edge-quantizer's dynamic-range recipe (the same images, from the same weights).
All files of one model are timed in one interleaved run (XNNPACK, 1 thread, batch 1, medians); ratios
are against that run's fp32 file. Agreement: top-1 of each file against the float torch model on 512
test images (on random weights this measures rounding, not accuracy); with --train-steps also each
file's top-1 accuracy on them.

    .venv/bin/python -m benchmarks.precision [--models vit_s gru ...] [--train-steps 150] [--qat-steps 100] [--rounds 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import sparselite  # noqa: F401  (makes the registry's torchvision importable)
from sparselite import LiteRTModel, export_tflite
from sparselite.data.fashion_mnist import load_split, resize_images
from sparselite.export.conversion import export_float_tflite, float_model_for_export
from sparselite.runtime.bench import interleaved_benchmark


class LSTMClassifier(nn.Module):
    """Reads an image row by row with an LSTM and classifies its last hidden state."""

    def __init__(self, features: int = 28, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.lstm(x.flatten(1, 2))
        return self.head(output[:, -1])


def build(name: str) -> tuple[nn.Module, tuple[int, int, int]]:
    """The model and the [C, H, W] it reads: the zoo's sequence models, the demo, torchvision's and timm's
    (random init; no download)."""
    from sparselite.models.mobilenet import MobileNetLite
    from sparselite.models.sequence import GRUClassifier

    if name == "gru":
        return GRUClassifier(hidden=64), (1, 28, 28)
    if name == "lstm":
        return LSTMClassifier(), (1, 28, 28)
    if name == "demo":
        return MobileNetLite(), (1, 28, 28)
    import torchvision.models as tvm

    if name == "vit_s":  # ViT-S's shape: 6 layers x 384, 6 heads, MLP 1536
        return tvm.VisionTransformer(image_size=64, patch_size=8, num_layers=6, num_heads=6, hidden_dim=384,
                                     mlp_dim=1536, num_classes=10), (3, 64, 64)
    if name == "vit_tiny":  # the model zoo's
        return tvm.VisionTransformer(image_size=64, patch_size=8, num_layers=2, num_heads=4, hidden_dim=96,
                                     mlp_dim=192, num_classes=10), (3, 64, 64)
    if hasattr(tvm, name):
        return getattr(tvm, name)(weights=None, num_classes=10), (3, 64, 64)
    import timm  # the test extra's; hybrid conv + attention families (mobilevit_xxs, efficientvit_b0)

    return timm.create_model(name, pretrained=False, num_classes=10), (3, 64, 64)


def dynamic_precision(model: nn.Module) -> str | dict[str, str]:
    depthwise = [name for name, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]
    return {"default": "dynamic_int8", "|".join(map(__import__("re").escape, depthwise)): "fp32"} if depthwise else "dynamic_int8"


def aeq_files(fp32: Path, folder: Path) -> dict[str, Path]:
    from ai_edge_quantizer import qtyping, quantizer, recipe, recipe_manager

    fp16 = recipe_manager.RecipeManager()
    fp16.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
                                algorithm_key=recipe.AlgorithmName.FLOAT_CASTING)
    files = {}
    for label, chosen in (("aeq_dynamic_int8", recipe.dynamic_wi8_afp32()), ("aeq_fp16", fp16.get_quantization_recipe())):
        q = quantizer.Quantizer(str(fp32))
        q.load_quantization_recipe(chosen)
        files[label] = folder / f"{label}.tflite"
        files[label].write_bytes(q.quantize().quantized_model)
    return files


def agreement(path: Path, model: nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        expected = model(images).argmax(1).numpy()
    got = LiteRTModel(path)(images.numpy()).argmax(1)
    return float(np.mean(got == expected))


def train(model: nn.Module, shape: tuple[int, int, int], steps: int, start: int = 0, simulator=None) -> None:
    """``steps`` Adam steps of 32 Fashion-MNIST training images (resized to ``shape``), from image
    ``start * 32`` on; with a QAT ``simulator`` (prepared on ``model``), stepped as its callback steps it."""
    images, labels = load_split("train", None)
    images, labels = images[start * 32:(start + steps) * 32], labels[start * 32:(start + steps) * 32]
    if tuple(images.shape[1:]) != shape:
        images = resize_images(images, shape[-1], shape[0])
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    for step in range(steps):
        if simulator is not None:
            simulator.step(step)
        batch = slice(step * 32, step * 32 + 32)
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def after_more_steps(model: nn.Module, shape: tuple[int, int, int], chosen, args: argparse.Namespace,
                     example: torch.Tensor, calibration: torch.Tensor, files: dict[str, Path],
                     folder: Path) -> dict[str, nn.Module]:
    """Two ways on from the same trained weights, ``--qat-steps`` more steps each on the same images:
    QAT simulating auto's choice (``chosen``: 'int8' or its per-layer mapping), then the export that
    follows it ("auto+qat"); and float training, then ai-edge-quantizer's dynamic-range recipe
    ("aeq_dynamic_int8+more"). Adds both files; returns the float model each one's agreement is
    measured against (the QAT model with its simulation stripped, and the float model)."""
    from sparselite.quantization.float_activations import FloatActivationSimulator
    from sparselite.quantization.layer_precision import is_int8_file
    from sparselite.quantization.qat import QuantizationSimulator

    more, qat = copy.deepcopy(model), copy.deepcopy(model)
    train(more, shape, args.qat_steps, start=args.train_steps)
    int8 = is_int8_file(chosen)  # the int8 file (with dynamic-range islands, perhaps): int8 QAT
    simulator = QuantizationSimulator() if int8 else FloatActivationSimulator(chosen)
    simulator.prepare(qat, (example,))
    train(qat, shape, args.qat_steps, start=args.train_steps, simulator=simulator)
    more.eval()
    qat.eval()
    files["auto+qat"] = folder / "auto_qat.tflite"
    export_tflite(qat, example, files["auto+qat"], calibration_data=[calibration], min_agreement=0.0, precision=chosen,
                  float_fallback="xnnpack" if int8 else False)
    (folder / "more").mkdir()
    export_float_tflite(more, example, folder / "more" / "fp32.tflite")
    files["aeq_dynamic_int8+more"] = aeq_files(folder / "more" / "fp32.tflite", folder / "more")["aeq_dynamic_int8"]
    return {"auto+qat": float_model_for_export(qat), "aeq_dynamic_int8+more": more}


def top1(path: Path, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float(np.mean(LiteRTModel(path)(images.numpy()).argmax(1) == labels.numpy()))


def run_model(name: str, args: argparse.Namespace, folder: Path) -> list[dict]:
    torch.manual_seed(0)
    model, shape = build(name)
    if args.train_steps:
        train(model, shape, args.train_steps)
    model.eval()
    images, labels = load_split("test", None)
    images, labels = images[:768], labels[:768]
    if tuple(images.shape[1:]) != shape:
        images = resize_images(images, shape[-1], shape[0])
    example, calibration, held_out = images[:1], images[:256], images[256:768]
    files = {"fp32": folder / "fp32.tflite"}
    export_float_tflite(model, example, files["fp32"])
    notes = {}
    for precision in ("fp16", "dynamic_int8", "int8"):
        files[precision] = folder / f"{precision}.tflite"
        chosen = dynamic_precision(model) if precision == "dynamic_int8" else precision
        try:
            report = export_tflite(model, example, files[precision], calibration_data=[calibration], precision=chosen,
                                   float_fallback="xnnpack" if precision == "int8" else False, min_agreement=0.0)
            notes[precision] = "" if isinstance(chosen, str) else "depthwise fp32"
            if precision == "int8" and report.float_islands:
                notes[precision] = "islands: " + ", ".join(sorted({i.op for i in report.float_islands}))[:40]
        except sparselite.SparseliteError as err:
            print(f"  {name} {precision}: {err}")
            del files[precision]
    files["auto"] = folder / "auto.tflite"
    report = export_tflite(model, example, files["auto"], verify_data=[held_out[:256]], calibration_data=[calibration],
                           verify_labels=[labels[256:512]], precision="auto", min_agreement=0.0)
    choice = report.precision_choice
    dynamic = sum(row["precision"] == "dynamic_int8" for row in choice["layers"])
    notes["auto"] = ("the int8 file" if choice["file"] == "int8" else
                     f"{dynamic}/{len(choice['layers'])} layers dynamic" + (", the rest int8" if choice["file"] == "int8+dynamic" else ""))
    reasons = collections.Counter(row["reason"].split(" (")[0] for row in choice["layers"])
    print(f"  {name} auto: {dict(reasons)}; latency vs fp32 {choice['latency_vs_fp32']}, top-1 points lost "
          f"({choice['measured_in']}) {choice['top1_drop']}", flush=True)
    try:
        files.update(aeq_files(files["fp32"], folder))
    except Exception as err:  # ai-edge-quantizer refuses some converted graphs
        print(f"  {name}: ai-edge-quantizer failed: {type(err).__name__}: {str(err).splitlines()[0]}", flush=True)
    references = dict.fromkeys(files, model)
    if args.qat_steps:
        references.update(after_more_steps(model, shape, choice["precision"], args, example, calibration, files, folder))
    latency = interleaved_benchmark({k: str(v) for k, v in files.items()}, threads=1, rounds=args.rounds,
                                    runs_per_round=args.runs)
    base_ms, base_bytes = latency["fp32"].median_ms, files["fp32"].stat().st_size
    return [{"model": name, "file": label, "bytes": path.stat().st_size, "size_ratio": path.stat().st_size / base_bytes,
             "median_ms": latency[label].median_ms, "latency_ratio": latency[label].median_ms / base_ms,
             "agreement": agreement(path, references[label], held_out), "note": notes.get(label, ""),
             "top1": top1(path, held_out, labels[256:768]) if args.train_steps else None}
            for label, path in files.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+",
                        default=["vit_s", "vit_tiny", "gru", "lstm", "demo", "mobilenet_v2", "resnet18",
                                 "mobilevit_xxs", "efficientvit_b0"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per file per round")
    parser.add_argument("--train-steps", type=int, default=0, help="Adam steps on Fashion-MNIST before exporting")
    parser.add_argument("--qat-steps", type=int, default=0,
                        help="with --train-steps: N more steps, QAT simulating auto's choice against float + ai-edge-quantizer")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from benchmarks import _common as C

    environment = C.environment_line(C.environment())  # at the start: the load the run began under
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory() as folder:
            rows += run_model(name, args, Path(folder))
        print(f"done {name}", flush=True)
        if args.json:  # after each model: a late failure keeps what was measured
            C.write_json(str(args.json), rows)
    print(environment)
    print(f"{'model':<16}{'file':<23}{'KB':>9}{'size':>8}{'latency':>9}{'agree':>8}{'top-1':>7}  note")
    for r in rows:
        accuracy = "-" if r["top1"] is None else f"{r['top1']:.3f}"
        print(f"{r['model']:<16}{r['file']:<23}{r['bytes'] / 1024:>9.1f}{r['size_ratio']:>7.2f}x{r['latency_ratio']:>8.2f}x"
              f"{r['agreement']:>8.3f}{accuracy:>7}  {r['note']}")
    print(f"(XNNPACK, 1 thread, batch 1, {args.rounds}x{args.runs} interleaved runs per file; ratios against the same "
          "run's fp32 file; " + (f"{args.train_steps} training steps" if args.train_steps else "random weights") +
          "; agreement: top-1 against the float torch model on 512 test images)")
    if args.json:
        C.write_json(str(args.json), rows)


if __name__ == "__main__":
    main()
