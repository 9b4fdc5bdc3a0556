"""``export_from_loader``: export a trained module with verify and calibration batches taken from a
data loader, and write the report next to the file. The ``TFLiteExport`` callback and
``sparselite export`` both end here.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from sparselite.errors import SparseliteError
from sparselite.export.destination import check_destination
from sparselite.export.report import ExportReport, FloatFallback, report_path
from sparselite.export.tflite import export_tflite


def export_from_loader(
    module: nn.Module,
    loader: Iterable,
    path: str | Path,
    *,
    verify_batches: int = 8,
    calibration_batches: int = 8,
    io_dtype: str = "float32",
    sparse: bool = True,
    min_agreement: float = 0.98,
    gpu_check: bool = False,
    require_gpu: bool = False,
    float_fallback: FloatFallback = False,
) -> ExportReport:
    """The first ``verify_batches`` batches of ``loader`` check the file, the next ``calibration_batches``
    calibrate ranges QAT did not learn; writes ``path`` and its report (``report_path(path)``).

    The example input is the module's ``example_input_array`` when it has one, else one loader example.
    """
    check_destination(path, report_path(path))  # before reading batches, not after the export
    inputs = [batch[0] if isinstance(batch, (tuple, list)) else batch
              for batch in itertools.islice(loader, verify_batches + calibration_batches)]
    if not inputs:
        raise SparseliteError("the validation data gave no batches; the export needs some to verify the file")
    example = getattr(module, "example_input_array", None)
    if not isinstance(example, torch.Tensor):
        example = inputs[0][:1]
    report = export_tflite(
        module, example[:1], path, io_dtype=io_dtype, sparse=sparse,
        calibration=inputs[verify_batches:], verify_batches=inputs[:verify_batches],
        min_agreement=min_agreement, gpu_check=gpu_check, require_gpu=require_gpu, float_fallback=float_fallback,
        report_path=report_path(path),
    )
    return report
