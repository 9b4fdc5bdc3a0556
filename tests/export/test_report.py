"""ExportReport: one place for the report's path, a JSON round trip, and a summary a user reads."""

from __future__ import annotations

import json
from pathlib import Path

from sparselite.export.report import ExportReport, LayerSparsity, Parity, report_path


def _report() -> ExportReport:
    return ExportReport(path="out/model.tflite", file_bytes=2048, io_dtype="float32", ranges_learned=7,
                        ranges_calibrated=0, parity=Parity(128, 0.99, 2.0, 0.1, "fake-quant"),
                        layers=[LayerSparsity("features.2.0", "features.2.0;1", 0.8, 0.8)],
                        overall_sparsity_in_file=0.8, dense_int8_bytes=4096, xz_bytes=1500, dense_int8_xz_bytes=1600,
                        notes=["a note"])


def test_report_path_is_next_to_the_file():
    assert report_path("runs/x/model.tflite") == Path("runs/x/model.json")


def test_save_writes_the_dict_as_json(tmp_path):
    report = _report()
    report.save(tmp_path / "model.json")
    assert json.loads((tmp_path / "model.json").read_text()) == json.loads(json.dumps(report.to_dict()))


def test_summary_names_size_parity_sparsity_and_notes():
    summary = _report().summary()
    assert summary.startswith("out/model.tflite: 2.0 KiB, float32 I/O, 7 learned + 0 derived + 0 fixed + 0 calibrated")
    assert "top-1 agreement 99.00%" in summary and "2.0 LSB" in summary
    assert "with dense weight storage 4,096 B" in summary
    assert "80.0% over 1 pruned layers" in summary and "note: a note" in summary
