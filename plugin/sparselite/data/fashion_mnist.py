"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (no downloads at run time)."""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset, default_collate

from sparselite.errors import SparseliteError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get install dataset-fashion-mnist (or: apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb <dir>, then set SPARSELITE_DATA=<dir>/usr/share/datasets/fashion-mnist)"
# Per-pixel statistics of the training set, so inputs are roughly zero-mean, unit-variance.
MEAN, STD = 0.2860, 0.3530

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _user_cache() -> Path:
    # Where scripts/setup.sh unpacks the Debian package on machines without root.
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparselite" / "fashion-mnist"


def resolve_root(root: str | None = None) -> Path:
    path = Path(root or os.environ.get("SPARSELITE_DATA") or DEFAULT_ROOT)
    if root is None and "SPARSELITE_DATA" not in os.environ and not path.is_dir() and _user_cache().is_dir():
        path = _user_cache()
    missing = [f for pair in _FILES.values() for f in pair if not (path / f).is_file()]
    if missing:
        raise SparseliteError(f"Fashion-MNIST not found in {path} (missing {missing[0]}); fix: {INSTALL_HINT}")
    return path


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(split: str, root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N,1,28,28] float32 normalized, labels [N] int64) of 'train' or 'test'."""
    path = resolve_root(root)
    images_file, labels_file = _FILES[split]
    images = torch.from_numpy(_read_idx(path / images_file).copy()).float().div_(255.0).sub_(MEAN).div_(STD)
    labels = torch.from_numpy(_read_idx(path / labels_file).astype(np.int64))
    return images.unsqueeze(1), labels


class FashionMNISTDataModule(pl.LightningDataModule):
    """60k train (the last ``val_size`` held out for validation) and the 10k test set.

    Args:
        root: folder with the four ``*-ubyte.gz`` files; default ``$SPARSELITE_DATA`` or the Debian path.
        batch_size: training and evaluation batch size.
        val_size: training images held out for validation (and export calibration/verification).
        train_subset: use only the first N training images (quick runs and tests); None = all.
        image_size: side of the square images the model sees (28 = as stored; models built for
            ImageNet-sized inputs, such as torchvision's, want 64 or more). Resized per batch.
        channels: 1 (grayscale, as stored) or 3 (the gray image repeated, for RGB models).
    """

    def __init__(self, root: str | None = None, batch_size: int = 128, val_size: int = 5000,
                 train_subset: int | None = None, num_workers: int = 0, image_size: int = 28,
                 channels: int = 1) -> None:
        super().__init__()
        if batch_size < 1:
            raise SparseliteError(f"batch_size={batch_size} must be >= 1")
        if not 8 <= image_size <= 512:
            raise SparseliteError(f"image_size={image_size} must be in [8, 512]")
        if channels not in (1, 3):
            raise SparseliteError(f"channels={channels} must be 1 or 3")
        if not 0 < val_size < 60000:
            raise SparseliteError(f"val_size={val_size} must be in (0, 60000)")
        if train_subset is not None and train_subset < 1:
            raise SparseliteError(f"train_subset={train_subset} must be >= 1 images (or null for the whole split)")
        if num_workers < 0:
            raise SparseliteError(f"num_workers={num_workers} must be >= 0 (0 loads in the main process)")
        self.save_hyperparameters()
        resolve_root(root)  # fail at construction, before a Trainer starts, with the fix in the message
        self.root, self.batch_size, self.val_size = root, batch_size, val_size
        self.train_subset, self.num_workers = train_subset, num_workers
        self.image_size, self.channels = image_size, channels

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        images, labels = load_split("train", self.root)
        train_x, train_y = images[: -self.val_size], labels[: -self.val_size]
        if self.train_subset:
            train_x, train_y = train_x[: self.train_subset], train_y[: self.train_subset]
        self.train_set = TensorDataset(train_x, train_y)
        self.val_set = TensorDataset(images[-self.val_size :], labels[-self.val_size :])
        self.test_set = TensorDataset(*load_split("test", self.root))

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        # Resized per batch: the whole set at 3x64x64 would take 3 GB.
        collate = None if (self.image_size, self.channels) == (28, 1) else functools.partial(
            _resized_batch, size=self.image_size, channels=self.channels)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(0) if shuffle else None, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


def resize_images(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """[N, 1, 28, 28] -> [N, channels, size, size] (bilinear; gray repeated for RGB models)."""
    if images.shape[-1] != size:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.expand(-1, channels, -1, -1).contiguous() if channels != images.shape[1] else images


def _resized_batch(items: list[tuple[torch.Tensor, torch.Tensor]], size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = default_collate(items)
    return resize_images(images, size, channels), labels
