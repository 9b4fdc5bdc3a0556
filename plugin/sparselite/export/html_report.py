"""An export report as one self-contained HTML page: tables, and plots drawn with matplotlib as inline SVG.

``build_html(report)`` turns an ``ExportReport`` (or its JSON, as a dict) into a page that needs nothing
else: no scripts, no fonts, no network (every plot is an ``<img>`` holding a base64 SVG data URI, so the
plots' SVG ids cannot clash). It shows only what the report and the run left behind, and says so where a
number is not there instead of inventing one. Three optional extras go in when they exist:

- the ``.tflite`` the report describes (its sha256 must match): the precision of each layer's weight;
- the run's CSV metrics (Lightning's ``CSVLogger``, found next to the export by ``find_run_metrics``) and
  the ``config.yaml`` LightningCLI saved beside them: the sparsity and QAT schedules over the steps;
- each op type's and each layer's share of the XNNPACK latency, timed alone (``time_latency_shares``; in the
  report when the export timed them, else by ``sparselite report``).

No Lightning and no torch here: the page can be rebuilt from any saved ``model.json``.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparselite.errors import SparseliteError
from sparselite.export.html_sections import (
    GENERATOR, Page, is_count, as_number, accuracy_section, channels_section, header, latency_section, layers_section, notes_section,
    schedule_section, size_section,
)
from sparselite.tflite.flatbuffer import write_atomically

MAX_REPORT_BYTES = 16 << 20
MAX_METRIC_ROWS = 200_000


def html_path(tflite_path: str | Path) -> Path:
    """Where an export's HTML page goes: next to the file, ``model.tflite`` -> ``model.html``."""
    return Path(tflite_path).with_suffix(".html")


def is_ours(path: str | Path) -> bool:
    """Whether ``path`` is a page this module wrote (so it may be replaced)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2048)
    except OSError:
        return False
    return f'content="{GENERATOR}"'.encode() in head


# ---------------------------------------------------------------------------------------------- inputs


def load_report_json(path: str | Path) -> dict[str, Any]:
    """A saved export report as a dict, or ``SparseliteError`` (one line) if it is not one."""
    path = Path(path)
    if not path.exists():
        raise SparseliteError(f"{path} does not exist; give the model.json an export wrote next to its .tflite")
    if path.is_dir():
        raise SparseliteError(f"{path} is a folder; give the model.json an export wrote next to its .tflite")
    try:
        if path.stat().st_size > MAX_REPORT_BYTES:
            raise SparseliteError(f"{path} is {path.stat().st_size >> 20} MiB; an export report is a few KiB of JSON")
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SparseliteError(f"cannot read {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise SparseliteError(f"{path} is not a sparselite export report: not JSON ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(data, dict) or not {"path", "file_bytes", "io_dtype"} <= set(data):
        raise SparseliteError(f"{path} is not a sparselite export report: it has no path, file_bytes and io_dtype")
    if not is_count(data["file_bytes"]) or not isinstance(data["path"], str):
        raise SparseliteError(f"{path} is not a sparselite export report: file_bytes and path have the wrong types")
    return data


def model_file_for(report: Mapping[str, Any], report_json: str | Path | None = None) -> tuple[Path | None, str | None]:
    """The .tflite a report describes, if it is on disk and matches the report's sha256: (path, None), or
    (None, why not)."""
    candidates = []
    if report_json is not None:
        candidates.append(Path(report_json).with_suffix(".tflite"))
    if isinstance(report.get("path"), str):
        candidates.append(Path(report["path"]))
    for candidate in candidates:
        if candidate.is_file():
            recorded = report.get("sha256")
            if recorded and hashlib.sha256(candidate.read_bytes()).hexdigest() != recorded:
                return None, f"{candidate} is not the file this report describes (its sha256 differs)"
            return candidate, None
    return None, "the .tflite this report describes is not next to it"


@dataclass
class RunMetrics:
    """What a training run logged (Lightning's CSV logger) and how it was configured."""

    source: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(step, value)]
    schedules: dict[str, dict[str, Any]] = field(default_factory=dict)  # callback name -> init_args


def find_run_metrics(near: str | Path) -> Path | None:
    """The newest ``metrics.csv`` of a Lightning run next to ``near`` (the report's folder or its parent:
    ``<root>/lightning_logs/version_N/metrics.csv``), or None."""
    folder = Path(near)
    folder = folder if folder.is_dir() else folder.parent
    found: list[Path] = []
    for base in (folder, folder.parent):
        for pattern in ("metrics.csv", "version_*/metrics.csv", "lightning_logs/version_*/metrics.csv", "*/version_*/metrics.csv"):
            found.extend(p for p in base.glob(pattern) if p.is_file())
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def read_run_metrics(path: str | Path) -> RunMetrics:
    """The series a CSV metrics file holds (one column a metric, a 'step' column), and the schedule of each
    compression callback from the ``config.yaml`` beside it, if there is one."""
    path = Path(path)
    metrics = RunMetrics(source=str(path))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for index, row in enumerate(csv.DictReader(f)):
                if index >= MAX_METRIC_ROWS:
                    break
                step = as_number(row.get("step"))
                if step is None:
                    continue
                for key, text in row.items():
                    value = as_number(text)
                    if key and key not in ("step", "epoch") and value is not None:
                        metrics.series.setdefault(key, []).append((int(step), value))
    except (OSError, UnicodeDecodeError, csv.Error):
        return metrics
    config = path.parent / "config.yaml"
    if config.is_file():
        metrics.schedules = _compression_schedules(config)
    return metrics


def _compression_schedules(config: Path) -> dict[str, dict[str, Any]]:
    import yaml

    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
        callbacks = (data.get("trainer") or {}).get("callbacks") or []
    except Exception:  # a config we cannot read has no schedule for us; the page says so
        return {}
    schedules = {}
    for callback in callbacks if isinstance(callbacks, list) else []:
        if isinstance(callback, dict) and isinstance(callback.get("class_path"), str):
            name = callback["class_path"].rsplit(".", 1)[-1]
            if name in ("GradualPruning", "QuantizationAwareTraining", "ChannelPruning"):
                schedules[name] = dict(callback.get("init_args") or {})
    return schedules


# ---------------------------------------------------------------------------------------------- facts


def weight_precisions(tflite: str | Path) -> dict[str, str]:
    """TFLite tensor name -> storage type of every constant an op reads (its weights and biases)."""
    from sparselite.tflite.flatbuffer import read_model, tensor_name, tensor_type_name

    model = read_model(tflite)
    graph = model.subgraphs[0]
    precisions = {}
    for op in graph.operators or []:
        for t in op.inputs if op.inputs is not None else []:
            if t < 0:
                continue
            tensor = graph.tensors[t]
            if model.buffers[tensor.buffer].data is not None or tensor.sparsity is not None:
                precisions[tensor_name(tensor)] = tensor_type_name(tensor.type)
    return precisions


def time_latency_shares(tflite: str | Path, budget_s: float = 10.0, rounds: int = 5,
                        runs_per_round: int = 20) -> dict[str, Any]:
    """Each op type's and each weight layer's share of the file's XNNPACK latency (1 thread), its ops cut
    out and timed alone, interleaved with the whole file (``runtime/op_cost.py``; an estimate that errs both
    ways): ``{"op_types": {type: share}, "layers": [{"layer", "op", "precision", "share"}], "setting"}``.
    DENSIFY runs once at load and is left out. Fewer runs when the file is slow; ``SparseliteError`` when
    even the fewest would take longer than ``budget_s``."""
    from sparselite.runtime.op_cost import latency_shares, median_latencies
    from sparselite.tflite.flatbuffer import read_model

    data = Path(tflite).read_bytes()
    model = read_model(data)
    types, layers = _op_groups(model)
    subsets = {f"type {name}": ops for name, ops in types.items()} | {f"layer {name}": g["ops"] for name, g in layers.items()}
    whole_s = median_latencies({"whole": data}, warmup=1, rounds=1, runs_per_round=3)["whole"]
    # Every cut-out file costs at most the whole one; 3 warm-up runs each.
    per_run = whole_s * (len(subsets) + 1)
    runs = min(runs_per_round, int(budget_s / max(per_run, 1e-9)) // rounds - 3)
    if runs < 2:
        raise SparseliteError(f"one run of the file takes {whole_s * 1e3:.1f} ms; timing its {len(types)} op types and "
                              f"{len(layers)} layers would take more than {budget_s:.0f} s")
    shares = latency_shares(model, data, subsets, rounds=rounds, runs_per_round=runs)
    return {"op_types": {name: shares[f"type {name}"] for name in types},
            "layers": [{"layer": name, "op": g["op"], "precision": g["precision"], "share": shares[f"layer {name}"]}
                       for name, g in layers.items()],
            "setting": f"XNNPACK, 1 thread, each group's ops cut out and timed alone, {rounds}x{runs} runs interleaved "
                       "with the whole file"}


def _op_groups(model) -> tuple[dict[str, list[int]], dict[str, dict[str, Any]]]:
    """The ops of each op type (DENSIFY left out), and of each weight layer: the conv/FC ops reading one stored
    weight (an unrolled RNN's steps read one), named after the torch module its tensor name carries."""
    from sparselite.tflite.flatbuffer import builtin_code, builtin_name, tensor_name
    from sparselite.tflite.ops import op_precision, stored_weight

    graph = model.subgraphs[0]
    producers = {int(t): op for op in graph.operators or [] for t in op.outputs}
    types: dict[str, list[int]] = {}
    layers: dict[str, dict[str, Any]] = {}
    for index, op in enumerate(graph.operators or []):
        name = builtin_name(builtin_code(model, op))
        if name == "DENSIFY":
            continue
        types.setdefault(name, []).append(index)
        weight = stored_weight(model, op, producers, graph)
        if weight is not None:
            layer = tensor_name(graph.tensors[weight]).split(";")[0] or f"{name} {index}"
            group = layers.setdefault(layer, {"ops": [], "op": name, "precision": op_precision(model, graph, op, producers)})
            group["ops"].append(index)
    return types, layers


# ---------------------------------------------------------------------------------------------- page


def build_html(report: Any, *, model_file: str | Path | None = None, model_note: str | None = None,
               metrics: RunMetrics | None = None, latency_shares: Mapping[str, Any] | None = None,
               latency_shares_note: str | None = None, source: str | None = None) -> str:
    """The page for ``report`` (an ``ExportReport`` or its dict). ``model_file``: the .tflite it describes
    (for weight precisions); ``metrics``: the run's logged metrics; ``latency_shares``: each op type's and
    layer's share of the file's XNNPACK latency (``time_latency_shares``; by default the report's own); the
    notes say why an extra is absent."""
    data = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    precisions: dict[str, str] = {}
    if model_file is not None:
        try:
            precisions = weight_precisions(model_file)
        except SparseliteError as err:
            model_note = f"{model_file} could not be read: {err}"
    page = Page(title=f"sparselite report: {Path(str(data.get('path', 'model'))).name}")
    header(page, data, source)
    accuracy_section(page, data)
    size_section(page, data)
    if latency_shares is None and isinstance(data.get("latency_shares"), dict):
        latency_shares = data["latency_shares"]
    latency_section(page, data, latency_shares, latency_shares_note)
    layers_section(page, data, precisions, model_note)
    schedule_section(page, metrics)
    channels_section(page, data)
    notes_section(page, data)
    return page.render()


def write_html(path: str | Path, text: str) -> None:
    write_atomically(path, text.encode("utf-8"))


def write_report_html(report: Any, tflite_path: str | Path) -> Path:
    """The page next to an export that was just written (``model.tflite`` -> ``model.html``), with the run's
    metrics when they are found next to it. Refuses to replace an HTML file it did not write."""
    out = html_path(tflite_path)
    if out.exists() and not is_ours(out):
        raise SparseliteError(f"{out} exists and is not a sparselite report page; it was left as it is")
    metrics_csv = find_run_metrics(tflite_path)
    note = "not timed at export; `sparselite report MODEL.json` times each op type and layer"
    page = build_html(report, model_file=tflite_path, metrics=read_run_metrics(metrics_csv) if metrics_csv else None,
                      latency_shares_note=note, source=str(Path(tflite_path).with_suffix(".json")))
    write_html(out, page)
    return out


def timed_latency_shares(tflite: str | Path, budget_s: float = 10.0) -> tuple[dict[str, Any] | None, str | None]:
    """``time_latency_shares``, or (None, why it could not be timed)."""
    try:
        return time_latency_shares(tflite, budget_s=budget_s), None
    except Exception as err:  # a file XNNPACK cannot run in pieces still gets its page
        return None, f"the ops could not be timed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
