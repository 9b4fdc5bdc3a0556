"""The HTML page every export writes next to its report (and `sparselite report` rebuilds from the JSON):
self-contained, showing what the report holds, saying what it does not, and rendering in a real browser."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import time

import lightning.pytorch as pl
import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger

from conftest import make_loader, tiny_mobilenet
from sparselite import GradualPruning, QuantizationAwareTraining, SparseliteError
from sparselite.export import html_report
from sparselite.export.from_loader import LATENCY_SHARES_BUDGET_S, export_from_loader
from sparselite.models.classifier import ImageClassifier

IMG = re.compile(r'<img class="plot" id="(plot-\d+)" alt="([^"]*)" src="data:image/svg\+xml;base64,([^"]+)">')


@pytest.fixture(scope="module")
def export_run(fmnist_train, fmnist_heldout, tmp_path_factory):
    """A tiny model pruned to 70% and QAT-trained for 40 steps under Lightning's CSV logger, exported into
    the run's folder the way TFLiteExport does (``<root>/model.tflite`` next to ``<root>/lightning_logs``),
    with the config.yaml LightningCLI would have saved beside the metrics."""
    root = tmp_path_factory.mktemp("html_run")
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(tiny_mobilenet(), lr=2e-2)
    callbacks = [GradualPruning(final_sparsity=0.7, begin_step=0, end_step=20, frequency=5, min_params=200),
                 QuantizationAwareTraining(begin_step=15, freeze_step=35)]
    logger = CSVLogger(root)
    trainer = pl.Trainer(accelerator="cpu", max_steps=40, callbacks=callbacks, logger=logger, log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, make_loader(fmnist_train, 1280, batch_size=64))
    (root / "lightning_logs" / "version_0" / "config.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "sparselite.GradualPruning", "init_args": {"final_sparsity": 0.7, "begin_step": 0, "end_step": 20}},
        {"class_path": "sparselite.QuantizationAwareTraining", "init_args": {"begin_step": 15, "freeze_step": 35}}]}}))
    path = root / "model.tflite"
    started = time.perf_counter()
    report = export_from_loader(module, make_loader(fmnist_heldout, 256, batch_size=64), path,
                                verify_batches=2, calibration_batches=1)
    return path, report, time.perf_counter() - started


def plots(page: str) -> list[tuple[str, str, str]]:
    """(id, alt text, SVG source) of every plot on the page."""
    return [(i, alt, base64.b64decode(data).decode()) for i, alt, data in IMG.findall(page)]


def test_every_export_writes_its_page_next_to_the_report(export_run):
    path, report, _ = export_run
    page_path = path.with_suffix(".html")
    assert page_path.is_file() and html_report.is_ours(page_path)
    page = page_path.read_text()
    assert f"sha256 <code>{report.sha256[:16]}" in page  # the page names the exact file it describes
    found = plots(page)
    # accuracy/parity, size, op-type latency, layer latency, layer sparsity, layer bytes, schedules
    assert len(found) == 7, [alt for _, alt, _ in found]
    for _, alt, svg in found:
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "<path" in svg, alt
    for layer in report.layers:  # per-layer sparsity: every pruned layer, read from the file
        assert layer.layer in page
    assert "Per-layer sparsity read from the file against training" in page
    assert "Share of XNNPACK latency per op type" in page  # a small file is timed at export
    assert "Share of XNNPACK latency per weight layer, with its precision" in page
    assert "CONV_2D" in page and ">int8<" in page  # each weight's precision, read from the file


def test_the_page_is_self_contained(export_run):
    page = export_run[0].with_suffix(".html").read_text()
    outside_plots = IMG.sub("", page)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "http" not in outside_plots  # no URL of any kind outside the inline SVG (whose xmlns is one)


def test_numbers_not_in_the_report_are_said_to_be_missing(export_run):
    page = export_run[0].with_suffix(".html").read_text()
    # The fit's validation batches have labels: the three accuracies are in the report, and on the page.
    assert "Top-1 accuracy of the fp32 model, the fake-quant model and the file is not in this report" not in page
    assert "top-1, the .tflite file" in page and "not in this report</td>" not in page.split("Size")[0]
    assert "Channel pruning" not in page  # no channel pruning ran: no section, rather than empty bars


def test_size_and_latency_against_the_fp32_file_of_the_same_weights(export_run):
    path, report, _ = export_run
    page = path.with_suffix(".html").read_text()
    assert "Latency against the fp32 file is not in this report" not in page
    assert "fp32 file&#x27;s size is not in this report" not in page
    # int8 weights take a quarter of fp32's bytes; in a model this tiny, the graph and the quantization
    # parameters take much of the rest.
    assert report.file_bytes < 0.6 * report.fp32_bytes, (report.file_bytes, report.fp32_bytes)
    latency = report.latency
    assert latency["ms"] > 0 and latency["fp32_ms"] > 0 and latency["ratio"] == pytest.approx(latency["ms"] / latency["fp32_ms"])
    assert f"{latency['ratio']:.2f}x" in page and f"{report.fp32_bytes:,}" in page and "interleaved" in page
    assert "vs the fp32 file" in report.summary()
    saved = json.loads(path.with_suffix(".json").read_text())  # the JSON holds what the page shows
    assert saved["fp32_bytes"] == report.fp32_bytes and saved["latency"] == latency


def test_every_weight_layer_has_its_precision_and_share_of_the_latency(export_run):
    path, report, _ = export_run
    shares = report.latency_shares
    layers = {entry["layer"]: entry for entry in shares["layers"]}
    # Every pruned layer's weight, and the unpruned ones (depthwise convs), each with the precision it has.
    assert {layer.tensor.split(";")[0] for layer in report.layers} < set(layers)
    assert {entry["precision"] for entry in layers.values()} == {"int8"}
    assert {entry["op"] for entry in layers.values()} == {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}
    assert all(0 < entry["share"] < 1.5 for entry in layers.values())  # alone, a layer may cost more than in the file
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"} <= set(shares["op_types"])
    assert "DENSIFY" not in shares["op_types"]  # it runs once, at load
    page = path.with_suffix(".html").read_text()
    for name in layers:
        assert f"<td>{name}</td>" in page


def test_a_report_without_the_comparison_says_so(export_run):
    data = json.loads(export_run[0].with_suffix(".json").read_text())
    data.pop("latency"), data.pop("fp32_bytes")
    page = html_report.build_html(data)
    assert "Latency against the fp32 file is not in this report" in page
    assert "fp32 file&#x27;s size is not in this report" in page


def test_schedules_come_from_the_runs_metrics_and_config(export_run):
    page = export_run[0].with_suffix(".html").read_text()
    (schedule,) = [svg for _, alt, svg in plots(page) if alt.startswith("Sparsity over the steps")]
    assert "metrics.csv" in page and "QAT schedule is not known" not in page
    assert schedule.count("<path") > 10


def test_a_saved_report_alone_still_gives_a_page(export_run, tmp_path):
    """Only the JSON copied elsewhere: no file (no precisions, no new timing) and no run logs."""
    path, report, _ = export_run
    data = json.loads(path.with_suffix(".json").read_text())
    data["path"] = str(tmp_path / "gone.tflite")
    saved = tmp_path / "model.json"
    saved.write_text(json.dumps(data))
    loaded = html_report.load_report_json(saved)
    model, note = html_report.model_file_for(loaded, saved)
    assert model is None and "not next to it" in note
    page = html_report.build_html(loaded, model_note=note, source=str(saved))
    assert "Weight storage types need the .tflite the report describes" in page
    assert "No logged metrics of the training run were found" in page
    # parity, size, op-type and layer latency (timed at export, kept in the report), layer sparsity, layer bytes
    assert len(plots(page)) == 6
    # A different file next to the report is not taken for the one it describes.
    shutil.copy(path, tmp_path / "model.tflite")
    (tmp_path / "model.tflite").write_bytes((tmp_path / "model.tflite").read_bytes() + b"\0")
    assert "sha256 differs" in html_report.model_file_for(loaded, saved)[1]


def test_channel_pruning_before_and_after(export_run):
    data = export_run[1].to_dict()
    data["channels"] = {"removed_channels": 0.5, "params_before": 20000, "params_after": 6000, "macs_before": 900000,
                        "macs_after": 310000, "latency_ms_before": 0.4, "latency_ms_after": 0.2,
                        "latency_setting": "XNNPACK, 1 thread"}
    page = html_report.build_html(data)
    assert "Channel pruning" in page and "0.30x" in page and "0.34x" in page and "0.50x" in page
    assert any(alt.startswith("Channel pruning:") for _, alt, _ in plots(page))


def test_a_page_the_user_wrote_is_never_replaced(export_run, tmp_path):
    path, report, _ = export_run
    mine = tmp_path / "model.html"
    mine.write_text("<html>my notes</html>")
    with pytest.raises(SparseliteError, match="is not a sparselite report page"):
        html_report.write_report_html(report, tmp_path / "model.tflite")
    assert mine.read_text() == "<html>my notes</html>"


def test_the_page_costs_little_of_the_export(export_run, tmp_path):
    path, report, export_s = export_run
    started = time.perf_counter()
    shutil.copy(path, tmp_path / "model.tflite")
    html_report.timed_latency_shares(tmp_path / "model.tflite", LATENCY_SHARES_BUDGET_S)
    html_report.write_report_html(report, tmp_path / "model.tflite")
    assert time.perf_counter() - started < max(5.0, 0.5 * export_s)


@pytest.fixture(scope="module")
def chromium():
    from browser import chromium_binary

    binary = chromium_binary()
    if binary is None:
        pytest.skip("Chromium is not installed: `bash scripts/setup.sh --test` installs it (Debian package chromium)")
    return binary


def _blank(png: bytes) -> bool:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("L")
    histogram = image.histogram()
    inked = sum(histogram[:200])  # pixels clearly darker than the white background
    return inked < 0.01 * image.width * image.height


@pytest.mark.filterwarnings("ignore:os.fork")  # preexec_fn wires the DevTools pipe
def test_the_page_renders_in_chromium(export_run, chromium):
    from browser import render

    page_path = export_run[0].with_suffix(".html")
    shown = render(page_path, chromium)
    assert shown.console_errors == [] and shown.failed_requests == []
    assert all(url.startswith(("file:", "data:")) for url in shown.requests), shown.requests  # no network
    assert shown.title.startswith("sparselite report")
    expected = [i for i, _, _ in plots(page_path.read_text())]
    images = {p["id"]: p for p in shown.plots if p["tag"] == "img"}
    assert sorted(images) == sorted(expected)
    for plot_id, box in images.items():
        assert box["complete"] and box["naturalWidth"] > 100 and box["naturalHeight"] > 50, box
        assert box["width"] > 200 and box["height"] > 50, box  # laid out, not collapsed
        assert not _blank(shown.plot_screenshots[plot_id]), plot_id
    assert not _blank(shown.screenshot)


@pytest.mark.slow  # a subprocess: ~6 s of imports on a quiet machine, twice that under load
def test_sparselite_report_rebuilds_the_page_from_the_json(export_run, tmp_path):
    from test_cli import run_cli

    path, _, _ = export_run
    out = tmp_path / "again.html"
    result = run_cli("report", str(path.with_suffix(".json")), "-o", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(out) in result.stdout and "metrics.csv" in result.stdout
    assert html_report.is_ours(out) and len(plots(out.read_text())) == 7  # as the export wrote it
    assert "Traceback" not in result.stderr
