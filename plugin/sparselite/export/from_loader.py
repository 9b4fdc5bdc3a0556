"""``export_from_loader``: export a trained module with verify and calibration batches taken from a
data loader, and write the report next to the file (``model.json``, and the page ``model.html``). The
``TFLiteExport`` callback and ``sparselite export`` both end here.
"""

from __future__ import annotations

import itertools
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparselite.errors import SparseliteError
from sparselite.export.html_report import html_path, is_ours, write_report_html
from sparselite.export.options import ExportOptions
from sparselite.export.report import ExportReport, report_path
from sparselite.export.tflite import export_tflite
from sparselite.pruning.channels import ChannelPruner

log = logging.getLogger("sparselite")


def export_from_loader(module: nn.Module, loader: Iterable, path: str | Path, options: ExportOptions | None = None, *,
                       channel_pruner: ChannelPruner | None = None, **option_values: Any) -> ExportReport:
    """The first ``verify_batches`` batches of ``loader`` check the file, the next ``calibration_batches``
    calibrate ranges QAT did not learn; writes ``path`` and its report (``report_path(path)``).

    Batches are ``(inputs, ...)`` tuples or lists (the inputs come first) or bare input tensors. The
    example input is the module's ``example_input_array`` when it has one, else one loader example.
    ``channel_pruner``: a ``ChannelPruner`` that removed channels; the report then compares the file with
    the full-width model (``channel_report.py``).
    """
    options = ExportOptions.build(options, option_values)
    verify_count = options.verify_batches or 0
    batches = list(itertools.islice(loader, verify_count + options.calibration_batches))
    inputs = [batch[0] if isinstance(batch, (tuple, list)) else batch for batch in batches]
    if not inputs:
        raise SparseliteError("the validation data gave no batches; the export needs some to verify or calibrate the file")
    example = getattr(module, "example_input_array", None)
    example = (example if isinstance(example, torch.Tensor) else inputs[0])[:1]
    calibration = inputs[verify_count:]
    page = html_path(path)
    if page.exists() and is_ours(page):
        page.unlink()  # like the old report: a kill during the export leaves no page describing the old file
    report = export_tflite(module, example, path, options, calibration_data=calibration, report_path=report_path(path),
                           verify_data=inputs[:verify_count] if options.verifies else None,
                           verify_labels=_class_labels(batches[:verify_count]))
    if channel_pruner is not None and channel_pruner.shrunk:
        from sparselite.export.channel_report import compare_with_unpruned

        report.channels = compare_with_unpruned(channel_pruner, example, path, calibration or inputs[:1])
    _compare_with_fp32(report, module, example, path, keep_weights_constant=options.require_gpu)
    _time_latency_shares(report, path)
    report.save(report_path(path))
    _write_page(report, path)
    return report


def _class_labels(batches: list) -> list[torch.Tensor] | None:
    """The batches' second items when every one is a vector of class indices, one per input."""
    labels = [batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None for batch in batches]
    if not labels or any(not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype not in (torch.int64, torch.int32)
                         or len(y) != len(batch[0]) for y, batch in zip(labels, batches)):
        return None
    return labels


def _compare_with_fp32(report: ExportReport, module: nn.Module, example: torch.Tensor, path: str | Path,
                       keep_weights_constant: bool = False) -> None:
    """Size and latency against the fp32 file, for the report and its page; the export stands without them."""
    from sparselite.export.fp32_comparison import compare_with_fp32

    log.info("export: timing the file against the fp32 file of the same weights")
    try:
        compared = compare_with_fp32(module, example, path, keep_weights_constant)
    except Exception as err:  # e.g. a model litert-torch converts only quantized; the file is written either way
        report.notes.append(f"no comparison with the fp32 file: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        return
    report.fp32_bytes, report.latency = compared["fp32_bytes"], compared["latency"]


# Op types and layers are timed at export only while that stays this cheap (a small model: well under a second).
LATENCY_SHARES_BUDGET_S = 2.0


def _time_latency_shares(report: ExportReport, path: str | Path) -> None:
    from sparselite.export.html_report import timed_latency_shares

    report.latency_shares, why = timed_latency_shares(path, LATENCY_SHARES_BUDGET_S)
    if report.latency_shares is None:
        report.notes.append(f"each op type's and layer's share of the latency was not timed at export ({why}); "
                            "`sparselite report MODEL.json` times them with a larger budget")


def _write_page(report: ExportReport, path: str | Path) -> None:
    """The HTML page next to the report. The file and its JSON are what an export promises; a page that
    cannot be written is one line on stderr, never a failed export."""
    try:
        write_report_html(report, path)
    except SparseliteError as err:
        print(f"sparselite: warning: no report page written: {err}", file=sys.stderr)
    except Exception as err:  # the page is a view of the report; a bug in it must not lose the export
        print(f"sparselite: warning: no report page written ({type(err).__name__}: {err}); "
              f"`sparselite report {report_path(path)}` retries it", file=sys.stderr)
