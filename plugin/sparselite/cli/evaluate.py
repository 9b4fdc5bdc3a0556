"""``sparselite eval``: top-1, top-5 and the confusion matrix of a .tflite on Fashion-MNIST, a config's data or an image folder."""

from __future__ import annotations

import argparse
import json

from sparselite.cli.errors import _explain, _sparselite_cause
from sparselite.errors import SparseliteError


def eval_command(ns: argparse.Namespace) -> None:
    """Top-1, top-5 and the confusion matrix of a .tflite on Fashion-MNIST (default), a config's
    datamodule (-c), or a folder of images (--images, one subfolder per class)."""
    import itertools

    import numpy as np

    import sparselite.evaluation as evaluation

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

    from sparselite.lightning_cli import build_datamodule

    try:

        return build_datamodule(configs)
    except ArgumentError as err:
        raise SparseliteError(_explain(err)) from None
    except ValueError as err:
        if _sparselite_cause(err) is None:
            raise
        raise SparseliteError(_explain(err)) from None



def add_eval_parser(sub) -> None:
    """``sparselite eval``."""
    p = sub.add_parser("eval", help="top-1, top-5 and confusion matrix of a .tflite on Fashion-MNIST, a config's data (-c) "
                                    "or an image folder")
    p.add_argument("model")
    p.add_argument("--accelerator", choices=("xnnpack", "reference", "gpu"), default="xnnpack")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=eval_command)
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
