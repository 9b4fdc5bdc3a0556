"""``TFLiteExport``: export, verify and report at the end of ``trainer.fit``."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from sparselite.errors import SparseliteError
from sparselite.export.report import FLOAT_FALLBACKS, FloatFallback


class TFLiteExport(pl.Callback):
    """Write a fully int8 ``.tflite`` (and its export report, ``model.tflite`` -> ``model.json``) when fit ends.

    Args:
        path: output file.
        io_dtype: 'float32' or 'int8' model inputs/outputs.
        sparse: sparse-encode pruned weights where that saves bytes.
        verify_batches: validation batches the file is checked on (XNNPACK vs the torch model).
        calibration_batches: validation batches used to calibrate ranges QAT did not learn.
        min_agreement: top-1 agreement below which the export fails.
        gpu_check / require_gpu: add a GPU compatibility report / fail if not fully delegated.
        float_fallback: keep ops that have no int8 TFLite kernel in float (a mixed-precision file, its
            float islands listed in the report) instead of failing; 'xnnpack' also keeps float the modules
            whose int8 ops XNNPACK does not delegate (LayerNorm, attention: faster on XNNPACK).
    """

    def __init__(self, path: str = "model.tflite", io_dtype: Literal["float32", "int8"] = "float32", sparse: bool = True,
                 verify_batches: int = 8, calibration_batches: int = 8, min_agreement: float = 0.98,
                 gpu_check: bool = False, require_gpu: bool = False, float_fallback: FloatFallback = False) -> None:
        if io_dtype not in ("float32", "int8"):
            raise SparseliteError(f"io_dtype='{io_dtype}' must be 'float32' or 'int8'")
        if verify_batches < 1 or calibration_batches < 0:
            raise SparseliteError("verify_batches must be >= 1 and calibration_batches >= 0")
        if not Path(path).suffix == ".tflite":
            raise SparseliteError(f"path='{path}' should end in .tflite")
        self.path, self.io_dtype, self.sparse = Path(path), io_dtype, sparse
        self.verify_batches, self.calibration_batches = verify_batches, calibration_batches
        if not 0.0 <= min_agreement <= 1.0:
            raise SparseliteError(f"min_agreement={min_agreement} must be in [0, 1]")
        self.min_agreement, self.gpu_check, self.require_gpu = min_agreement, gpu_check, require_gpu
        if float_fallback not in FLOAT_FALLBACKS:
            raise SparseliteError(f"float_fallback={float_fallback!r} must be false, true or 'xnnpack'")
        self.float_fallback = float_fallback
        self.report = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # A read-only folder or a path that is not a model must fail before training, not after it.
        if stage == "fit" and trainer.is_global_zero:
            from sparselite.export.destination import check_destination
            from sparselite.export.report import report_path

            check_destination(self.path, report_path(self.path))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from sparselite.export.from_loader import export_from_loader  # litert-torch loads only when exporting

        loader = trainer.datamodule.val_dataloader() if trainer.datamodule else trainer.val_dataloaders
        if loader is None:
            raise SparseliteError("TFLiteExport needs validation data to verify the export; give the Trainer a val dataloader")
        rank_zero_info(f"[sparselite] exporting int8 TFLite to {self.path}")
        self.report = export_from_loader(
            pl_module, loader, self.path, verify_batches=self.verify_batches,
            calibration_batches=self.calibration_batches, io_dtype=self.io_dtype, sparse=self.sparse,
            min_agreement=self.min_agreement, gpu_check=self.gpu_check, require_gpu=self.require_gpu,
            float_fallback=self.float_fallback,
        )
        channels = next((cb.pruner for cb in trainer.callbacks if type(cb).__name__ == "ChannelPruning" and cb.pruner.shrunk), None)
        if channels is not None:
            from sparselite.export.channel_report import compare_with_unpruned
            from sparselite.export.report import report_path

            inputs = [batch[0] if isinstance(batch, (tuple, list)) else batch
                      for batch in itertools.islice(loader, self.verify_batches + self.calibration_batches)]
            example = pl_module.example_input_array
            example = example if isinstance(example, torch.Tensor) else inputs[0][:1]
            self.report.channels = compare_with_unpruned(channels, example[:1], self.path, inputs[self.verify_batches:] or inputs[:1])
            self.report.save(report_path(self.path))
        rank_zero_info("[sparselite] " + self.report.summary())
