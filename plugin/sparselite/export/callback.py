"""``TFLiteExport``: export, verify and report at the end of ``trainer.fit``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from sparselite.errors import SparseliteError
from sparselite.export.auto_precision import CHECKPOINT_KEY, DEFAULT_MAX_ACCURACY_DROP, store_choice, stored_choice
from sparselite.export.options import ExportOptions
from sparselite.export.report import FloatFallback, report_path


class TFLiteExport(pl.Callback):
    """Write a fully int8 ``.tflite`` (and its export report, ``model.tflite`` -> ``model.json``) when fit ends.

    The batches come from the validation data. Args: ``path``, the output file, and the options of
    ``ExportOptions`` by the same names (see its docstring): ``io_dtype``, ``sparse``, ``verify_batches``
    (None skips the parity check), ``calibration_batches``, ``min_agreement``, ``gpu_check``,
    ``require_gpu``, ``float_fallback``, ``precision``, ``max_accuracy_drop``.
    """

    def __init__(self, path: str = "model.tflite", io_dtype: Literal["float32", "int8"] = "float32", sparse: bool = True,
                 verify_batches: int | None = 8, calibration_batches: int = 8, min_agreement: float = 0.98,
                 gpu_check: bool = False, require_gpu: bool = False, float_fallback: FloatFallback = False,
                 precision: Union[str, dict[str, str], None] = None,
                 max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP) -> None:
        if Path(path).suffix != ".tflite":
            raise SparseliteError(f"path='{path}' should end in .tflite")
        self.path = Path(path)
        self.options = ExportOptions(io_dtype=io_dtype, sparse=sparse, verify_batches=verify_batches,
                                     calibration_batches=calibration_batches, min_agreement=min_agreement,
                                     gpu_check=gpu_check, require_gpu=require_gpu, float_fallback=float_fallback,
                                     precision=precision, max_accuracy_drop=max_accuracy_drop)
        self.report = None
        self.precision_choice: dict | None = None  # precision='auto': what was chosen (auto_precision.py)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # A read-only folder or a path that is not a model must fail before training, not after it.
        if stage == "fit" and trainer.is_global_zero:
            from sparselite.export.destination import check_destination

            check_destination(self.path, report_path(self.path))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from sparselite.export.from_loader import export_from_loader  # litert-torch loads only when exporting
        from sparselite.pruning.channel_callback import ChannelPruning

        if trainer.datamodule is None and trainer.val_dataloaders is None:
            trainer.fit_loop.epoch_loop.val_loop.setup_data()  # a run resumed at its end ran no validation
        loader = trainer.datamodule.val_dataloader() if trainer.datamodule else trainer.val_dataloaders
        if loader is None:
            raise SparseliteError("TFLiteExport needs validation data to verify the export; give the Trainer a val dataloader")
        channels = next((cb.pruner for cb in trainer.callbacks if isinstance(cb, ChannelPruning)), None)
        options = self.options
        if options.precision == "auto" and self.precision_choice is not None:  # a resumed run: chosen once
            options = options.with_choice(self.precision_choice)
            rank_zero_info("[sparselite] precision auto: the choice stored in the checkpoint")
        precision = options.precision or "as trained"
        rank_zero_info(f"[sparselite] exporting TFLite ({precision}) to {self.path}")
        self.report = export_from_loader(pl_module, loader, self.path, options, channel_pruner=channels)
        rank_zero_info("[sparselite] " + self.report.summary())
        if self.report.precision_choice is not None:
            self.precision_choice = self.report.precision_choice
            last = getattr(trainer.checkpoint_callback, "last_model_path", "")
            if last and Path(last).is_file():  # saved before fit ended: the choice joins it now
                store_choice(last, self.precision_choice)
                rank_zero_info(f"[sparselite] precision auto: the choice is stored in {last}")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.precision_choice is not None:
            checkpoint[CHECKPOINT_KEY] = self.precision_choice

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.precision_choice = stored_choice(checkpoint)
