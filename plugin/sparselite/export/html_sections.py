"""The sections of the export report's HTML page (``html_report.build_html`` assembles them): each writes its
tables and matplotlib plots (inline SVG) onto the ``Page``, and says where the report holds no number.
Over 350 lines: one function per section of one page, which read best side by side."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparselite.export.html_report import RunMetrics

GENERATOR = "sparselite export report"  # <meta name="generator">: a page we may overwrite
# Colours by weight precision: the TFLite type a weight is stored in, and a layer's precision.
PRECISION_COLOURS = {"int8": "#1f77b4", "float32": "#d62728", "float16": "#ff7f0e", "int16": "#9467bd",
                     "fp32": "#d62728", "fp16": "#ff7f0e", "dynamic_int8": "#17becf"}


@dataclass
class Page:
    title: str
    parts: list[str] = field(default_factory=list)
    plots: int = 0

    def add(self, text: str) -> None:
        self.parts.append(text)

    def section(self, heading: str) -> None:
        self.add(f"<h2>{_e(heading)}</h2>")

    def missing(self, text: str) -> None:
        self.add(f'<p class="missing">{_e(text)}</p>')

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        head = "".join(f"<th>{_e(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
        self.add(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def plot(self, figure, alt: str) -> None:
        self.plots += 1
        self.add(f'<figure><img class="plot" id="plot-{self.plots}" alt="{_e(alt)}" src="{_svg_data_uri(figure)}">'
                 f"<figcaption>{_e(alt)}</figcaption></figure>")

    def render(self) -> str:
        body = "\n".join(self.parts)
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
                f'<meta name="generator" content="{GENERATOR}">\n'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
                f"<title>{_e(self.title)}</title>\n<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}.missing{color:#8a5a00;background:#fff8e6;padding:.4em .6em;border-left:3px solid #e0a000}
figure{margin:1em 0}img.plot{max-width:100%;height:auto;display:block;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}code{background:#f4f4f4;padding:0 .2em}.meta{color:#555;font-size:.9em}
"""


def header(page: Page, data: dict, source: str | None) -> None:
    name = Path(str(data.get("path", "model"))).name
    page.add(f"<h1>{_e(name)}</h1>")
    facts = [f"{_bytes(data.get('file_bytes'))}", f"{_e(data.get('io_dtype'))} input/output"]
    if is_count(data.get("ranges_learned")):
        facts.append(f"{data['ranges_learned']} activation ranges learned in QAT, {data.get('ranges_derived', 0)} derived, "
                     f"{data.get('ranges_fixed', 0)} fixed by the kernel, {data.get('ranges_calibrated', 0)} calibrated")
    if data.get("precision") is not None:
        facts.append(f"precision option: {_e(json.dumps(data['precision']) if isinstance(data['precision'], dict) else data['precision'])}")
    page.add(f"<p>{' · '.join(facts)}</p>")
    meta = [f"file: <code>{_e(data.get('path'))}</code>"]
    if data.get("sha256"):
        meta.append(f"sha256 <code>{_e(str(data['sha256'])[:16])}…</code>")
    if source:
        meta.append(f"report: <code>{_e(source)}</code>")
    page.add(f'<p class="meta">{" · ".join(meta)}</p>')
    stages = data.get("stage_seconds")
    if isinstance(stages, dict) and stages:
        page.add('<p class="meta">export stages: ' + ", ".join(
            f"{_e(k)} {v:.1f} s" for k, v in stages.items() if _is_number(v)) + "</p>")


def accuracy_section(page: Page, data: dict) -> None:
    page.section("Accuracy and parity")
    accuracy = data.get("accuracy") if isinstance(data.get("accuracy"), dict) else {}
    rows = []
    for key, label in (("fp32", "fp32 torch model"), ("fake_quant", "fake-quant torch model (QAT)"), ("file", "the .tflite file")):
        value = accuracy.get(key)
        rows.append([f"top-1, {label}", _pct(value) if _is_number(value) else "not in this report"])
    parity = data.get("parity") if isinstance(data.get("parity"), dict) else None
    if parity:
        agreement = parity.get("top1_agreement")
        ties = parity.get("ties_excluded") or 0
        rows.append([f"top-1 agreement of the file with the {parity.get('reference', '?')} torch model",
                     f"{_pct(agreement)} over {parity.get('examples', '?')} examples"
                     + (f" ({ties} with a tied top logit excluded)" if ties else "")])
        rows.append(["largest logit difference", f"{_num(parity.get('max_logit_diff_lsb'), '.1f')} LSB of the int8 output scale"])
        if _is_number(parity.get("kernel_agreement")):
            rows.append(["noise floor: XNNPACK vs TFLite's builtin kernels on this file",
                         f"{_pct(parity['kernel_agreement'])}, {_num(parity.get('kernel_max_lsb'), '.1f')} LSB"])
    page.table(["measure", "value"], rows)
    if not accuracy:
        page.missing("Top-1 accuracy of the fp32 model, the fake-quant model and the file is not in this report; "
                     "score the file with `sparselite eval MODEL.tflite`.")
    if not parity:
        page.missing("Parity was not checked at export (verify_batches: none).")
    elif parity.get("degenerate_reference"):
        page.missing(f"Parity proves nothing here: the torch model {parity['degenerate_reference']}.")
    bars = {label: accuracy[key] for key, label in (("fp32", "fp32"), ("fake_quant", "fake-quant"), ("file", "file"))
            if _is_number(accuracy.get(key))}
    if parity and _is_number(parity.get("top1_agreement")):
        bars["parity"] = parity["top1_agreement"]
    if bars:
        fig, ax = _figure(6, 0.5 + 0.45 * len(bars))
        names = list(bars)
        ax.barh(names, [100 * bars[n] for n in names], color=["#7f7f7f" if n == "parity" else "#1f77b4" for n in names])
        for i, n in enumerate(names):
            ax.text(100 * bars[n], i, f" {100 * bars[n]:.2f}%", va="center", fontsize=8)
        ax.set_xlim(0, 112)
        ax.set_xlabel("%")
        ax.invert_yaxis()
        page.plot(fig, "Top-1 accuracy (where in the report) and the file's top-1 agreement with the torch model")


def size_section(page: Page, data: dict) -> None:
    page.section("Size")
    sizes = {"this file": data.get("file_bytes"), "dense weight storage": data.get("dense_int8_bytes"),
             "this file, xz -9": data.get("xz_bytes"), "dense storage, xz -9": data.get("dense_int8_xz_bytes"),
             "fp32 file": data.get("fp32_bytes")}
    present = {k: v for k, v in sizes.items() if is_count(v)}
    page.table(["file", "bytes"], [[k, f"{v:,}" if is_count(v) else "not in this report"] for k, v in sizes.items()])
    if not is_count(sizes["fp32 file"]):
        page.missing("The fp32 file's size is not in this report (export one with precision='fp32' to compare).")
    if present:
        fig, ax = _figure(6, 0.5 + 0.4 * len(present))
        names = list(present)
        ax.barh(names, [present[n] / 1024 for n in names], color="#1f77b4")
        for i, n in enumerate(names):
            ax.text(present[n] / 1024, i, f" {present[n] / 1024:.1f} KiB", va="center", fontsize=8)
        ax.set_xlabel("KiB")
        ax.set_xlim(0, max(present.values()) / 1024 * 1.25)
        ax.invert_yaxis()
        page.plot(fig, "File size: as stored, with dense weight storage, and compressed for download (xz -9)")


def latency_section(page: Page, data: dict, latency_shares: Mapping[str, Any] | None, note: str | None) -> None:
    page.section("Latency")
    latency = data.get("latency") if isinstance(data.get("latency"), dict) else {}
    if _is_number(latency.get("ms")) and _is_number(latency.get("fp32_ms")):
        page.table(["file", "median ms"], [["fp32 file", f"{latency['fp32_ms']:.3f}"], ["this file", f"{latency['ms']:.3f}"],
                                           ["ratio", f"{latency['ms'] / latency['fp32_ms']:.2f}x"]])
        if latency.get("setting"):
            page.add(f"<p>{_e(latency['setting'])}.</p>")
    else:
        page.missing("Latency against the fp32 file is not in this report; time both with "
                     "`sparselite bench fp32.tflite MODEL.tflite` (interleaved, same machine).")
    shares = latency_shares if isinstance(latency_shares, Mapping) else {}
    op_types = shares.get("op_types") if isinstance(shares.get("op_types"), Mapping) else {}
    by_type = sorted(((str(k), float(v)) for k, v in op_types.items() if _is_number(v)), key=lambda kv: -kv[1])
    if by_type:
        fig, ax = _figure(6.5, 0.5 + 0.32 * len(by_type))
        ax.barh([k for k, _ in by_type], [100 * v for _, v in by_type], color="#2ca02c")
        for i, (_, v) in enumerate(by_type):
            ax.text(100 * v, i, f" {100 * v:.0f}%", va="center", fontsize=8)
        ax.set_xlabel("% of the whole file's XNNPACK latency (each op type timed alone)")
        ax.set_xlim(0, max(100 * v for _, v in by_type) * 1.2 + 1)
        ax.invert_yaxis()
        page.plot(fig, "Share of XNNPACK latency per op type (1 thread; each type's ops cut out and timed alone, "
                       f"so the shares need not add up to 100%: here {100 * sum(v for _, v in by_type):.0f}%). An op that "
                       "XNNPACK fuses into its neighbour (a PAD into the next convolution) costs more alone than in the file.")
    else:
        page.missing(f"The share of XNNPACK latency per op type is not in this report ({note or 'not timed'}).")
    _layer_latency(page, shares.get("layers"))
    islands = [i for i in data.get("float_islands") or [] if isinstance(i, dict)]
    if islands:
        page.table(["float island op", "count", "from modules", "share of XNNPACK latency (timed alone)"],
                   [[i.get("op"), i.get("count"), ", ".join(map(str, (i.get("modules") or [])[:6])),
                     _pct(i.get("latency_share")) if _is_number(i.get("latency_share")) else "not timed"] for i in islands])
        timed = [i for i in islands if _is_number(i.get("latency_share"))]
        if timed:
            fig, ax = _figure(6.5, 0.5 + 0.32 * len(timed))
            ax.barh([f"{i.get('op')} x{i.get('count')}" for i in timed], [100 * i["latency_share"] for i in timed], color="#d62728")
            ax.set_xlabel("% of the XNNPACK latency (float ops, timed alone)")
            ax.invert_yaxis()
            page.plot(fig, "Float islands: their share of the XNNPACK latency")
        if _is_number(data.get("float_islands_latency_share")):
            page.add(f"<p>Float islands with their QUANTIZE/DEQUANTIZE borders: {_pct(data['float_islands_latency_share'])} "
                     "of the XNNPACK latency, timed alone.</p>")
    else:
        page.add("<p>Every op is int8 or a border op: the file has no float islands.</p>")


# The layers a chart shows, the costliest first (the table below it lists every one).
MAX_CHARTED_LAYERS = 30


def _layer_latency(page: Page, layers: Any) -> None:
    """Each weight layer's share of the XNNPACK latency, with its precision: which layers the time goes to."""
    rows = [l for l in layers if isinstance(l, Mapping) and _is_number(l.get("share"))] if isinstance(layers, list) else []
    if not rows:
        return
    rows = sorted(rows, key=lambda l: -float(l["share"]))
    charted = rows[:MAX_CHARTED_LAYERS]
    fig, ax = _figure(7, 0.6 + 0.3 * len(charted))
    colours = [PRECISION_COLOURS.get(str(l.get("precision")), "#7f7f7f") for l in charted]
    y = list(range(len(charted)))  # positions, not labels: two long names may shorten alike
    ax.barh(y, [100 * float(l["share"]) for l in charted], color=colours)
    ax.set_yticks(y, [f"{_short(str(l.get('layer')))} ({l.get('precision')})" for l in charted], fontsize=8)
    ax.set_xlabel("% of the whole file's XNNPACK latency (each layer's ops timed alone)")
    ax.invert_yaxis()
    shown = "" if len(rows) == len(charted) else f"; the {len(charted)} costliest of {len(rows)}"
    page.plot(fig, f"Share of XNNPACK latency per weight layer, with its precision (timed alone{shown})")
    page.table(["layer", "op", "precision", "share of XNNPACK latency (timed alone)"],
               [[l.get("layer"), l.get("op"), l.get("precision"), _pct(l["share"])] for l in rows])


def layers_section(page: Page, data: dict, precisions: dict[str, str], model_note: str | None) -> None:
    page.section("Layers")
    layers = [l for l in data.get("layers") or [] if isinstance(l, dict) and _is_number(l.get("sparsity_in_file"))]
    if layers:
        names = [_short(str(l.get("layer"))) for l in layers]
        fig, ax = _figure(7, 0.6 + 0.38 * len(layers))
        y = list(range(len(layers)))
        ax.barh([v - 0.2 for v in y], [100 * l["sparsity_in_file"] for l in layers], height=0.4, label="read from the file", color="#1f77b4")
        target = [100 * l["sparsity_in_training"] if _is_number(l.get("sparsity_in_training")) else 0.0 for l in layers]
        ax.barh([v + 0.2 for v in y], target, height=0.4, label="training's mask", color="#aec7e8")
        ax.set_yticks(y, names, fontsize=8)
        ax.set_xlim(0, 100)
        ax.set_xlabel("sparsity, %")
        ax.invert_yaxis()
        ax.legend(fontsize=8, loc="lower right")
        overall = data.get("overall_sparsity_in_file")
        page.plot(fig, "Per-layer sparsity read from the file against training's masks"
                  + (f" (overall {100 * overall:.1f}%)" if _is_number(overall) else ""))
    else:
        page.missing("No pruned layers in this report (the model was not pruned).")
    encodings = [e for e in data.get("sparse_encoding") or [] if isinstance(e, dict) and is_count(e.get("dense_bytes"))]
    if encodings:
        fig, ax = _figure(7, 0.6 + 0.3 * len(encodings))
        y = list(range(len(encodings)))
        colours = [PRECISION_COLOURS.get(precisions.get(str(e.get("name")), ""), "#7f7f7f") for e in encodings]
        ax.barh(y, [e["dense_bytes"] for e in encodings], height=0.8, color="#dddddd", label="dense")
        ax.barh(y, [e.get("stored_bytes", e["dense_bytes"]) for e in encodings], height=0.5, color=colours, label="stored")
        ax.set_yticks(y, [f"{_short(str(e.get('name')))} ({e.get('op', '?')})" for e in encodings], fontsize=7)
        ax.set_xlabel("bytes: grey = dense, colour = as stored")
        ax.invert_yaxis()
        from matplotlib.patches import Patch

        seen = sorted({precisions.get(str(e.get("name")), "unknown") for e in encodings})
        ax.legend(handles=[Patch(color="#dddddd", label="dense bytes")]
                  + [Patch(color=PRECISION_COLOURS.get(p, "#7f7f7f"), label=f"stored, {p}") for p in seen], fontsize=7, loc="lower right")
        page.plot(fig, "Weight bytes per tensor, dense against as stored (sparse encoding), coloured by precision")
        page.table(["weight tensor", "op", "precision", "sparsity", "encoding", "dense B", "stored B", "why dense"],
                   [[e.get("name"), e.get("op"), precisions.get(str(e.get("name")), "unknown"), _pct(e.get("sparsity")),
                     e.get("encoding"), e.get("dense_bytes"), e.get("stored_bytes"), e.get("reason") or ""] for e in encodings])
    else:
        page.missing("Per-tensor bytes (sparse_encoding) are not in this report.")
    by_layer = data.get("layer_precisions") if isinstance(data.get("layer_precisions"), dict) else {}
    if by_layer:
        page.table(["layer", "precision (the export's choice)"], [[k, v] for k, v in by_layer.items()])
    if not precisions:
        page.missing(f"Weight storage types need the .tflite the report describes: {model_note or 'not given'}"
                     + (" (the export's per-layer choice is above)." if by_layer else "."))


def schedule_section(page: Page, metrics: RunMetrics | None) -> None:
    page.section("Schedules")
    if metrics is None:
        page.missing("No logged metrics of the training run were found next to this report (Lightning's CSV logs: "
                     "lightning_logs/version_N/metrics.csv); `sparselite report MODEL.json --metrics FILE` points at them.")
        return
    sparsity = {k: v for k, v in metrics.series.items() if k.startswith("sparsity/")}
    loss = metrics.series.get("train/loss") or metrics.series.get("train_loss")
    pruning = metrics.schedules.get("GradualPruning", {})
    qat = metrics.schedules.get("QuantizationAwareTraining", {})
    if not sparsity and not loss and not pruning and not qat:
        page.missing(f"{metrics.source} holds no sparsity or loss series, and no config.yaml with the schedules is beside it.")
        return
    fig, axes = _figure(7.5, 4.2, rows=2)
    ax = axes[0]
    for name, points in sorted(sparsity.items(), key=lambda kv: kv[0] != "sparsity/overall"):
        steps, values = zip(*points)
        overall = name == "sparsity/overall"
        ax.plot(steps, [100 * v for v in values], lw=2.2 if overall else 0.8, alpha=1 if overall else 0.6,
                label="overall" if overall else None, color="#1f77b4" if overall else None, drawstyle="steps-post")
    if _is_number(pruning.get("final_sparsity")) and is_count(pruning.get("end_step")):
        ax.axhline(100 * pruning["final_sparsity"], ls=":", color="#555", lw=1, label="final_sparsity")
    ax.set_ylabel("sparsity, %")
    ax.set_ylim(0, 100)
    if not sparsity:
        ax.text(0.5, 0.5, "no sparsity was logged", transform=ax.transAxes, ha="center", va="center", color="#8a5a00")
    ax2 = axes[1]
    if loss:
        steps, values = zip(*loss)
        ax2.plot(steps, values, lw=0.8, color="#555")
        ax2.set_ylabel("train loss")
    else:
        ax2.text(0.5, 0.5, "no training loss was logged", transform=ax2.transAxes, ha="center", va="center", color="#8a5a00")
    ax2.set_xlabel("optimizer step")
    for axis in axes:
        if is_count(qat.get("begin_step")):
            end = qat.get("freeze_step") if is_count(qat.get("freeze_step")) else None
            if end is not None:
                axis.axvspan(qat["begin_step"], end, color="#ff7f0e", alpha=0.12, label="QAT (ranges learning)" if axis is ax else None)
                axis.axvline(end, color="#ff7f0e", lw=1, ls="--", label="QAT ranges frozen" if axis is ax else None)
            else:
                axis.axvline(qat["begin_step"], color="#ff7f0e", lw=1, label="QAT begins" if axis is ax else None)
        if is_count(pruning.get("begin_step")) and is_count(pruning.get("end_step")):
            axis.axvspan(pruning["begin_step"], pruning["end_step"], color="#1f77b4", alpha=0.06,
                         label="pruning ramp" if axis is ax else None)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    page.plot(fig, f"Sparsity over the steps (per layer, and overall) and the QAT phases, from {metrics.source}")
    if not qat:
        page.missing("The QAT schedule is not known: no config.yaml with a QuantizationAwareTraining callback beside the metrics.")


def channels_section(page: Page, data: dict) -> None:
    channels = data.get("channels")
    if not isinstance(channels, dict):
        return
    page.section("Channel pruning")
    rows, pairs = [], {}
    for key, label in (("params", "parameters"), ("macs", "MACs"), ("latency_ms", "int8 XNNPACK latency, ms")):
        before, after = channels.get(f"{key}_before"), channels.get(f"{key}_after")
        if _is_number(before) and _is_number(after) and before > 0:
            rows.append([label, f"{before:,.3f}" if key == "latency_ms" else f"{before:,}",
                         f"{after:,.3f}" if key == "latency_ms" else f"{after:,}", f"{after / before:.2f}x"])
            pairs[label] = after / before
    page.table(["", "before (full width)", "after", "after / before"], rows)
    if _is_number(channels.get("removed_channels")):
        page.add(f"<p>{_pct(channels['removed_channels'])} of the prunable channels removed. "
                 f"{_e(channels.get('latency_setting', ''))}</p>")
    if pairs:
        fig, ax = _figure(6, 0.6 + 0.45 * len(pairs))
        names = list(pairs)
        ax.barh(names, [100.0] * len(names), color="#dddddd", label="before")
        ax.barh(names, [100 * pairs[n] for n in names], height=0.5, color="#9467bd", label="after")
        for i, n in enumerate(names):
            ax.text(100 * pairs[n], i, f" {100 * pairs[n]:.0f}%", va="center", fontsize=8)
        ax.set_xlabel("% of the full-width model")
        ax.set_xlim(0, 115)
        ax.invert_yaxis()
        ax.legend(fontsize=8, loc="lower right")
        page.plot(fig, "Channel pruning: parameters, MACs and latency after, as a share of before")


def notes_section(page: Page, data: dict) -> None:
    notes = [str(n) for n in data.get("notes") or []]
    calibrated = data.get("calibrated_ranges") if isinstance(data.get("calibrated_ranges"), dict) else {}
    gpu = data.get("gpu") if isinstance(data.get("gpu"), dict) else None
    if not (notes or calibrated or gpu):
        return
    page.section("Notes")
    if notes:
        page.add("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    if calibrated:
        page.table(["activation range calibrated, not learned", "why"], [[k, v] for k, v in list(calibrated.items())[:100]])
    if gpu:
        page.add(f"<p>GPU: {'fully accelerated' if gpu.get('fully_accelerated') else 'not fully accelerated'}"
                 f" (adapter {_e(gpu.get('adapter'))}).</p>")


# ---------------------------------------------------------------------------------------------- helpers


def _figure(width: float, height: float, rows: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, max(height, 1.2)), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=rows > 1, squeeze=True)
    return fig, axes


def _svg_data_uri(fig) -> str:
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "sparselite", "svg.fonttype": "path"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue().encode("utf-8")).decode("ascii")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def as_number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}%" if _is_number(value) else "-"


def _num(value: Any, spec: str) -> str:
    return format(value, spec) if _is_number(value) else "-"


def _bytes(value: Any) -> str:
    return f"{value:,} B ({value / 1024:.1f} KiB)" if is_count(value) else "size unknown"


def _short(name: str, limit: int = 40) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]

