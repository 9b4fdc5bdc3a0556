"""``export_tflite``: a (pruned, QAT-trained) torch model -> a fully int8, verified ``.tflite``.

The work is a fixed sequence of stages (``stages.py``): prepare -> convert -> rewrite -> encode ->
verify -> write. Each is timed; ``report.stage_seconds`` holds the times of the stages before the write.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparselite.export.conversion import export_float_tflite, float_model_for_export
from sparselite.export.options import ExportOptions
from sparselite.export.report import ExportReport
from sparselite.export.stages import STAGE_TITLES, STAGES, ExportJob

__all__ = ["export_tflite", "export_float_tflite", "float_model_for_export"]

log = logging.getLogger("sparselite")


def export_tflite(
    module: nn.Module,
    example_inputs: torch.Tensor | tuple,
    path: str | Path,
    options: ExportOptions | None = None,
    *,
    verify_data: Iterable[torch.Tensor] | None = None,
    verify_labels: Iterable[torch.Tensor] | None = None,
    calibration_data: Iterable[torch.Tensor] | None = None,
    report_path: str | Path | None = None,
    **option_values: Any,
) -> ExportReport:
    """Export ``module`` (a LightningModule or a plain nn.Module) to a fully int8 ``.tflite`` at ``path``.

    Args:
        example_inputs: one input batch (its batch size is the model's); only shape and dtype matter.
        options: an ``ExportOptions``; ``option_values`` (the same names: ``io_dtype``, ``sparse``,
            ``verify_batches``, ``calibration_batches``, ``min_agreement``, ``gpu_check``,
            ``require_gpu``, ``float_fallback``) are set on top of it.
        verify_data: held-out input batches; the first ``verify_batches`` of them check the file on
            XNNPACK against the torch model (the fake-quant model when QAT ran). Below
            ``min_agreement`` the export fails and writes nothing. No data, or ``verify_batches=None``:
            no check.
        verify_labels: the class labels of ``verify_data``'s batches, if known: ``precision="auto"``
            then counts its accuracy budget in accuracy rather than in agreement with the float model.
        calibration_data: input batches; the first ``calibration_batches`` of them calibrate the ranges
            QAT did not learn (all ranges, for a model trained without QAT).
        report_path: also write the report (JSON) there, with the model as one unit
            (``destination.write_model_and_report``).

    ``path`` is checked first (``destination.check_destination``): it must end in .tflite, be writable,
    not be a folder or an existing file other than a model, and have room for the file.
    ``report.sha256`` is the written file's.
    """
    options = ExportOptions.build(options, option_values)
    verifying = verify_data is not None and options.verifies
    job = ExportJob(
        module=module, path=Path(path), options=options,
        example_inputs=(example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs),
        report_path=None if report_path is None else Path(report_path),
        verify_data=list(itertools.islice(verify_data, options.verify_batches)) if verifying else None,
        verify_labels=torch.cat(list(itertools.islice(verify_labels, options.verify_batches)))
        if verifying and verify_labels is not None else None,
        calibration_data=list(itertools.islice(calibration_data or [], options.calibration_batches)),
    )
    seconds: dict[str, float] = {}
    for number, stage in enumerate(STAGES, 1):
        if job.report is not None:  # the report written with the file holds every stage before the write
            job.report.stage_seconds = dict(seconds)
        log.info("export %d/%d %s: %s", number, len(STAGES), stage.__name__, STAGE_TITLES[stage.__name__])
        start = time.perf_counter()
        job = stage(job)
        seconds[stage.__name__] = round(time.perf_counter() - start, 3)
    log.info("export: wrote %s (%d bytes) in %.1f s", job.path, job.report.file_bytes, sum(seconds.values()))
    return job.report
