"""Scoring a .tflite on the user's data: top-1, top-5 and a confusion matrix (``sparselite eval``).

Data sources, each yielding batches of float32 inputs laid out as the torch model took them
(``[N, C, H, W]`` for images) and integer labels:

- ``image_folder_batches(root, ...)``: one subfolder per class (sorted names are the class indices,
  as torchvision's ``ImageFolder`` numbers them), PNG/JPEG files, resized to the model's input size and
  normalized as ``(pixel / 255 - mean) / std`` with one mean and std per channel;
- ``config_batches(configs)``: the datamodule of a training config (its test set, or its validation
  set when it has none), rebuilt the way ``sparselite fit`` builds runs, without training.

Everything that can be checked before the long work is (paths, folders, every image's header, the
model's input against the data), and each problem is one ``SparseliteError``. Images are decoded with
Pillow; only ``config_batches`` imports torch/Lightning (a datamodule needs them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparselite.errors import SparseliteError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BATCH = 256
TOP_K = 5
MAX_MATRIX_IN_TEXT = 20  # classes; above this the text shows the most frequent confusions instead


@dataclass
class ImageFolder:
    """The classes (sorted subfolder names) and every image file with its class index."""

    root: Path
    classes: list[str]
    files: list[tuple[Path, int]] = field(default_factory=list)


def scan_image_folder(root: str | Path) -> ImageFolder:
    """Check ``root`` (one subfolder per class, each holding PNG/JPEG files) and every image's header."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.exists():
        raise SparseliteError(f"--images {root} does not exist; give a folder with one subfolder of images per class")
    if not root.is_dir():
        raise SparseliteError(f"--images {root} is not a folder; give a folder with one subfolder of images per class")
    try:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as err:
        raise SparseliteError(f"--images {root} cannot be read: {err.strerror or err}") from None
    if not classes:
        raise SparseliteError(f"--images {root} has no class subfolders; put each class's images in a subfolder "
                              "named after the class")
    folder = ImageFolder(root, classes)
    for index, name in enumerate(classes):
        try:
            entries = sorted(p for p in (root / name).iterdir() if not p.name.startswith("."))
        except OSError as err:
            raise SparseliteError(f"class folder {root / name} cannot be read: {err.strerror or err}") from None
        images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        if not images:
            what = "is empty" if not entries else f"has no PNG/JPEG images ({len(entries)} other entries)"
            raise SparseliteError(f"class folder {root / name} {what}; every class needs at least one image")
        folder.files.extend((p, index) for p in images)
    for path, _ in folder.files:  # headers (and PNG checksums) now, before the model runs on anything
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
            raise SparseliteError(f"image {path} cannot be read ({_reason(err)}); remove or replace it") from None
    return folder


def _reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]
    return str(text)[:160]


def per_channel(values: Sequence[float] | None, channels: int, what: str, default: float) -> np.ndarray:
    """``--mean``/``--std``: one value per channel (a single value also serves a 1-channel model)."""
    if values is None:
        return np.full(channels, default, dtype=np.float32)
    values = [float(v) for v in values]
    if len(values) != channels:
        raise SparseliteError(f"--{what} has {len(values)} value(s) but the model takes {channels} channel(s); "
                              "give one value per channel")
    if not all(math.isfinite(v) for v in values) or (what == "std" and any(v <= 0 for v in values)):
        raise SparseliteError(f"--{what} {values} must be finite" + (" and > 0" if what == "std" else ""))
    return np.asarray(values, dtype=np.float32)


def image_input_layout(input_shape: Sequence[int], source: str) -> tuple[int, int, int, bool]:
    """(channels, height, width, channels_last) of an image model's input; refuses any other input."""
    shape = [int(d) for d in input_shape]
    if len(shape) == 4 and shape[1] in (1, 3) and shape[3] not in (1, 3):
        return shape[1], shape[2], shape[3], False
    if len(shape) == 4 and shape[3] in (1, 3) and shape[1] not in (1, 3):
        return shape[3], shape[1], shape[2], True
    if len(shape) == 4 and shape[1] in (1, 3):
        return shape[1], shape[2], shape[3], False
    raise SparseliteError(f"the model's input is {shape}, not a batch of 1- or 3-channel images; {source} gives images")


def image_folder_batches(folder: ImageFolder, channels: int, size: tuple[int, int], mean: np.ndarray,
                         std: np.ndarray, limit: int = 0, batch: int = BATCH) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """([N, C, H, W] float32, [N] int64) batches of ``folder``'s images, in file order."""
    from PIL import Image, UnidentifiedImageError

    files = folder.files[:limit] if limit else folder.files
    mode = "L" if channels == 1 else "RGB"
    height, width = size
    for start in range(0, len(files), batch):
        chunk = files[start : start + batch]
        images = np.empty((len(chunk), channels, height, width), dtype=np.float32)
        for i, (path, _) in enumerate(chunk):
            try:
                with Image.open(path) as image:
                    image = image.convert(mode)
                    if image.size != (width, height):
                        image = image.resize((width, height), Image.Resampling.BILINEAR)
                    pixels = np.asarray(image, dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
                raise SparseliteError(f"image {path} cannot be decoded ({_reason(err)}); remove or replace it") from None
            images[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
        images = (images - mean[None, :, None, None]) / std[None, :, None, None]
        yield images, np.asarray([label for _, label in chunk], dtype=np.int64)


def fit_to_model(inputs: np.ndarray, input_shape: Sequence[int], source: str) -> np.ndarray:
    """A batch of the data (as the torch model took it) in the layout and size the file takes, or a
    one-line refusal: other channels, or an input that is not an image and differs from the model's."""
    shape = [int(d) for d in input_shape]
    if list(inputs.shape[1:]) == shape[1:]:
        return inputs
    if inputs.ndim == 4 and len(shape) == 4:
        channels, height, width, channels_last = image_input_layout(shape, source)
        if inputs.shape[1] != channels:
            raise SparseliteError(f"the model takes {channels}-channel images ({shape}) but {source} gives "
                                  f"{inputs.shape[1]}-channel data ({list(inputs.shape[1:])} per example)")
        if inputs.shape[2:] != (height, width):
            inputs = _resize(inputs, height, width)
        return inputs.transpose(0, 2, 3, 1).copy() if channels_last else inputs
    raise SparseliteError(f"the model takes {shape} input but {source} gives {list(inputs.shape[1:])} per example")


def _resize(inputs: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of float [N, C, H, W] (Pillow's float mode, one plane at a time)."""
    from PIL import Image

    out = np.empty((*inputs.shape[:2], height, width), dtype=np.float32)
    for n in range(inputs.shape[0]):
        for c in range(inputs.shape[1]):
            plane = Image.fromarray(np.ascontiguousarray(inputs[n, c], dtype=np.float32), mode="F")
            out[n, c] = np.asarray(plane.resize((width, height), Image.Resampling.BILINEAR))
    return out


@dataclass
class Scores:
    """Top-1/top-k counts and the confusion matrix (rows: true class, columns: predicted class)."""

    num_classes: int
    top_k: int = TOP_K
    examples: int = 0
    top1: int = 0
    topk: int = 0
    confusion: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def add(self, logits: np.ndarray, labels: np.ndarray) -> None:
        logits = np.asarray(logits).reshape(len(labels), -1)
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if logits.shape[1] != self.num_classes:
            raise SparseliteError(f"the model gives {logits.shape[1]} outputs per example, expected {self.num_classes}")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise SparseliteError(f"the data has label {int(labels.max() if labels.max() >= self.num_classes else labels.min())}, "
                                  f"but the model has {self.num_classes} outputs (classes 0..{self.num_classes - 1})")
        predicted = logits.argmax(1)
        k = min(self.top_k, self.num_classes)
        best = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        self.examples += len(labels)
        self.top1 += int((predicted == labels).sum())
        self.topk += int((best == labels[:, None]).any(1).sum())
        np.add.at(self.confusion, (labels, predicted), 1)

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        top1 = self.top1 / max(self.examples, 1)
        return {"accuracy": top1, "top1": top1, f"top{self.top_k}": self.topk / max(self.examples, 1),
                "examples": self.examples, "classes": list(class_names or map(str, range(self.num_classes))),
                "confusion_matrix": self.confusion.tolist()}

    def format_confusion(self, class_names: Sequence[str] | None = None) -> str:
        """The matrix as text (rows: true, columns: predicted); for many classes, the largest confusions."""
        names = [str(n)[:10] for n in (class_names or range(self.num_classes))]
        names += [str(i) for i in range(len(names), self.num_classes)]
        if self.num_classes > MAX_MATRIX_IN_TEXT:
            off = self.confusion.copy()
            np.fill_diagonal(off, 0)
            order = np.argsort(off, axis=None)[::-1][:10]
            pairs = [(int(i // self.num_classes), int(i % self.num_classes)) for i in order]
            lines = [f"  {names[t]} -> {names[p]}: {off[t, p]}" for t, p in pairs if off[t, p]]
            return "most frequent confusions (true -> predicted):\n" + ("\n".join(lines) or "  none")
        width = max(max(len(n) for n in names), len(str(int(self.confusion.max()))), 3)
        header = " " * (width + 2) + " ".join(n.rjust(width) for n in names)
        shown = [i for i in range(self.num_classes)  # the data's classes, and any other row with examples
                 if class_names is None or i < len(class_names) or self.confusion[i].any()]
        rows = [f"{names[i].rjust(width)}  " + " ".join(str(int(v)).rjust(width) for v in self.confusion[i])
                for i in shown]
        return "confusion matrix (rows: true class, columns: predicted):\n" + "\n".join([header, *rows])


def score(model: Any, batches: Iterable[tuple[Any, Any]], num_classes: int, source: str) -> Scores:
    """Run ``model`` (a ``LiteRTModel``) over ``batches``; each batch is fitted to the model's input first."""
    scores = Scores(num_classes)
    for inputs, labels in batches:
        inputs = fit_to_model(np.asarray(inputs, dtype=np.float32), model.input_shape, source)
        scores.add(model(inputs), np.asarray(labels))
    if not scores.examples:
        raise SparseliteError(f"{source} gave no examples to evaluate")
    return scores


def output_classes(output_shape: Sequence[int]) -> int:
    """Classes of a classifier's output ([N, classes])."""
    shape = [int(d) for d in output_shape]
    if len(shape) != 2 or shape[1] < 1:
        raise SparseliteError(f"the model's output is {shape}, not [batch, classes]; sparselite eval scores classifiers")
    return shape[1]


def config_normalization(datamodule: Any) -> tuple[list[float] | None, list[float] | None]:
    """The mean/std a config's datamodule normalizes with: its ``mean``/``std`` (attributes or init
    arguments), else its module's ``MEAN``/``STD`` constants (the bundled Fashion-MNIST datamodule)."""
    import sys

    def values(name: str) -> list[float] | None:
        for source in (datamodule, getattr(datamodule, "hparams", None) or {}):
            value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
            if value is not None:
                break
        else:
            value = getattr(sys.modules.get(type(datamodule).__module__), name.upper(), None)
        if value is None:
            return None
        return [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]

    return values("mean"), values("std")


def config_loader(datamodule: Any) -> tuple[Any, str]:
    """(the datamodule's test loader, or its validation loader when it has no test set; which one)."""
    for stage, method in (("test", "test_dataloader"), ("validate", "val_dataloader")):
        try:
            datamodule.setup(stage)
            loader = getattr(datamodule, method)()
        except NotImplementedError:
            continue
        except Exception as err:  # Lightning's "`test_dataloader` must be implemented" (MisconfigurationException)
            if "must be implemented" in str(err) or type(err).__name__ == "MisconfigurationException":
                continue
            raise
        if loader is not None:
            return loader, "validation" if stage == "validate" else "test"
    raise SparseliteError(f"the config's datamodule ({type(datamodule).__name__}) has neither a test nor a "
                          "validation set to evaluate on")
