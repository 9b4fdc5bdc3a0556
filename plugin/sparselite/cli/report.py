"""``sparselite report``: the HTML page of a saved export report."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparselite.errors import SparseliteError


def report_command(ns: argparse.Namespace) -> None:
    """The HTML page of a saved export report (what every export also writes next to its file)."""
    from sparselite.export import html_report as pages
    from sparselite.export.report import report_path

    source = Path(ns.report)
    if source.suffix == ".tflite":  # the model itself: its report is next to it
        source = report_path(source)
    data = pages.load_report_json(source)
    out = Path(ns.output) if ns.output else source.with_suffix(".html")
    if out.suffix.lower() not in (".html", ".htm"):
        raise SparseliteError(f"output {out} must end in .html")
    if out.is_dir():
        raise SparseliteError(f"output {out} is a folder; give a file name such as {out / 'model.html'}")
    if out.exists() and not pages.is_ours(out):
        raise SparseliteError(f"{out} exists and is not a sparselite report page; refusing to overwrite it")
    model, model_note = pages.model_file_for(data, source)
    metrics_csv = Path(ns.metrics) if ns.metrics else pages.find_run_metrics(source)
    if ns.metrics and not metrics_csv.is_file():
        raise SparseliteError(f"--metrics {metrics_csv} does not exist")
    shares, timing_note = None, "--no-timing" if ns.no_timing else model_note
    if model is not None and not ns.no_timing:
        shares, timing_note = pages.timed_latency_shares(model, ns.timing_budget)
    try:
        page = pages.build_html(data, model_file=model, model_note=model_note, latency_shares=shares,
                                latency_shares_note=timing_note, source=str(source),
                                metrics=pages.read_run_metrics(metrics_csv) if metrics_csv else None)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as err:  # a hand-edited or foreign JSON
        raise SparseliteError(f"{source} is not a valid sparselite export report: {type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else ''}") from None
    pages.write_html(out, page)
    print(f"{out}: report page for {data['path']}" + (f" (run metrics: {metrics_csv})" if metrics_csv else ""))


def add_report_parser(sub) -> None:
    """``sparselite report``."""
    p = sub.add_parser("report", help="an HTML page (plots inline, no network) of a saved export report")
    p.add_argument("report", help="the model.json an export wrote (or the .tflite next to it)")
    p.add_argument("-o", "--output", default=None, help="the page (default: the report's name with .html)")
    p.add_argument("--metrics", default=None, help="the run's metrics.csv (default: the newest Lightning CSV log next to the report)")
    p.add_argument("--no-timing", action="store_true", help="do not time each op type of the .tflite on XNNPACK")
    p.add_argument("--timing-budget", type=float, default=30.0, help="seconds the op-type timing may take")
    p.set_defaults(func=report_command)
