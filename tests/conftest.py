"""Shared fixtures: a tiny MobileNetLite, a few hundred real Fashion-MNIST images, quiet logs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

# Before TF / litert import: keep their C++ logging off the test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("GLOG_minloglevel", "3")

import sparselite  # noqa: F401  (before Lightning: makes the test extra's torchvision importable, compat/torchvision.py)
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

# The test machine is shared and small: one intra-op thread avoids oversubscription (and is faster here).
torch.set_num_threads(1)

TINY_BLOCKS = ((16, 1), (32, 2))


def tiny_mobilenet(**kwargs) -> torch.nn.Module:
    """MobileNetLite small enough to train and export in seconds (stem 8, two separable blocks)."""
    from sparselite.models.mobilenet import MobileNetLite

    return MobileNetLite(stem_channels=8, blocks=TINY_BLOCKS, **kwargs)


# Lightning's advice for real runs, which the tiny test runs trigger on purpose.
QUIET_WARNINGS = [
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*but have no `val_dataloader`:UserWarning",
    "ignore:.*has `shuffle=True`:UserWarning",
    "ignore:.*Checkpoint directory .* exists and is not empty:UserWarning",
    "ignore:.*callbacks used to create the checkpoint need to be provided:UserWarning",
    "ignore:.*number of training batches .* is smaller than the logging interval:UserWarning",
    "ignore:.*isinstance\\(treespec, LeafSpec\\). is deprecated",
]


def pytest_configure(config: pytest.Config) -> None:
    for line in QUIET_WARNINGS:
        config.addinivalue_line("filterwarnings", line)
    for name in ("lightning.pytorch", "lightning.fabric", "litert_torch", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)


def pt2e_int8_tflite(model: torch.nn.Module, example: torch.Tensor, calibration: torch.Tensor | None = None,
                     *, quant_config: bool = True) -> bytes:
    """A per-channel int8 .tflite of ``model`` through pt2e + litert-torch, as the exporter lowers it.

    Calibrates on ``example`` (or on each row of ``calibration``): without a forward pass the weight
    scales stay 1.0. ``quant_config=False`` leaves a Q/DQ graph over float ops instead of int8 ops.
    """
    import tempfile

    import litert_torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(model.eval(), (example,)).module(), quantizer)
    if calibration is None:
        prepared(example)
    else:
        for i in range(len(calibration)):
            prepared(calibration[i : i + 1])
    converted = convert_pt2e(prepared, fold_quantize=False)
    kwargs = {"quant_config": QuantConfig(pt2e_quantizer=quantizer)} if quant_config else {}
    edge = litert_torch.convert(converted, (example,), **kwargs)
    with tempfile.TemporaryDirectory() as folder:
        edge.export(f"{folder}/model.tflite")
        return Path(folder, "model.tflite").read_bytes()


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_mobilenet()


@pytest.fixture(scope="session")
def fmnist_train() -> tuple[torch.Tensor, torch.Tensor]:
    """The first 2048 real training images (normalized) and labels."""
    from sparselite.data.fashion_mnist import load_split

    images, labels = load_split("train")
    return images[:2048].clone(), labels[:2048].clone()


@pytest.fixture(scope="session")
def fmnist_heldout() -> tuple[torch.Tensor, torch.Tensor]:
    """512 real images the training fixtures never see (the end of the train split)."""
    from sparselite.data.fashion_mnist import load_split

    images, labels = load_split("train")
    return images[-512:].clone(), labels[-512:].clone()


def make_loader(data: tuple[torch.Tensor, torch.Tensor], n: int, batch_size: int = 32) -> DataLoader:
    """A deterministic (unshuffled) loader over the first ``n`` examples."""
    images, labels = data
    return DataLoader(TensorDataset(images[:n], labels[:n]), batch_size=batch_size, shuffle=False)


def make_trainer(tmp_path: Path, max_steps: int, callbacks: list, checkpointing: bool = False, name: str = "run"):
    """A quiet, deterministic CPU Trainer with a CSV logger and no validation."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, callbacks=callbacks,
        enable_checkpointing=checkpointing, logger=CSVLogger(tmp_path, name=name), log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        deterministic=True,
    )


def fit_with_checkpoint_at(tmp_path: Path, callbacks: list, total: int, step: int, loader: DataLoader):
    """Run A of an exact-resume test: the tiny MobileNetLite (seed 0) trained ``total`` steps with
    ``callbacks``, saving ``<tmp_path>/ckpt/step=<step>.ckpt``. Returns (module, checkpoint path)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sparselite.models.classifier import ImageClassifier

    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(tiny_mobilenet(), lr=5e-3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=step, save_top_k=-1,
                                 filename="{step}", save_last=False)
    make_trainer(tmp_path, total, [*callbacks, checkpoint], checkpointing=True, name="a").fit(module, loader)
    return module, tmp_path / "ckpt" / f"step={step}.ckpt"


@pytest.fixture
def train_loader(fmnist_train) -> DataLoader:
    return make_loader(fmnist_train, 512)


def xnnpack_partitions(path) -> int:
    """How many pieces XNNPACK takes the graph in (1: every op delegated). Reads the interpreter's node
    list, which ai-edge-litert exposes only through a private method."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    return sum(op["op_name"] == "DELEGATE" for op in interpreter._get_ops_details())


def run_two_process_ddp(tmp_path: Path, script_text: str, timeout: float = 180) -> list[dict]:
    """Run ``script_text`` as a 2-process CPU DDP job (rank 0 spawns rank 1, Lightning's way) on a free
    loopback port; each rank saves ``rank{r}.pt`` in ``tmp_path``, which are returned (tensors only)."""
    import socket
    import subprocess
    import sys

    script = tmp_path / "train_ddp.py"
    script.write_text(script_text)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "PYTHONWARNINGS": "ignore", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
