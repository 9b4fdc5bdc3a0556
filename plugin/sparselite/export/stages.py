"""The export's stages. Each takes the ``ExportJob`` and returns it with its own part filled in:

  prepare   the float model (fake-quant and masks stripped, BN folded), the learned ranges, each layer's
            precision, the data
  choose    precision='auto' only: candidate files built by the next two stages, measured, and the
            precision they chose put in the options (``auto_precision.py``)
  convert   fully int8: pt2e quantization with the learned ranges, litert-torch conversion (and the float
            fallback); any other precision: the fp32 conversion
  rewrite   module names, XNNPACK's forms; fully int8: the float-island check, float I/O; otherwise each
            layer's weights in its precision (``precision.py``); shared quantization tables
  encode    sparse weight storage (fully int8 files), compressed sizes, per-layer sparsity read back
  verify    the parity gate on XNNPACK (and the GPU check), on the candidate file
  write     the file (and its report) replace the destination atomically

``export_tflite`` (tflite.py) runs them in this order and times each.
"""

from __future__ import annotations

import logging
import lzma
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ai_edge_litert.schema_py_generated import TensorType
from torch import nn

from sparselite.deploy_form import deploy_form_blocks, training_form_blocks
from sparselite.errors import SparseliteError
from sparselite.module_copy import detached_copy
from sparselite.export.auto_precision import PrecisionChoice, choose_precision
from sparselite.export.conversion import convert_float, convert_with_ranges, float_model_for_export
from sparselite.export.destination import check_destination, sha256_hex, size_bound, write_model_and_report
from sparselite.export.io import use_float_io
from sparselite.export.islands import (
    float_islands, int8_ops_xnnpack_leaves_out, islands_error, keep_float_where_xnnpack_lacks_int8, time_islands,
    xnnpack_fallback_notes,
)
from sparselite.export.xnnpack_forms import large_depthwise_convs_on_tflite, use_xnnpack_forms
from sparselite.export.names import use_module_names
from sparselite.export.options import ExportOptions
from sparselite.export.parity import gate_failure, measure_noise_floor, top1_accuracy, verify as verify_parity
from sparselite.export.precision import LayerFinder, apply_precisions, layer_precisions, precision_reference
from sparselite.quantization.layer_precision import is_int8_file
from sparselite.runtime.load_probe import mark_written
from sparselite.export.report import ExportReport, LayerSparsity, shortened
from sparselite.pruning.targets import masked_targets, pruned_weight
from sparselite.quantization.float_activations import simulated_precision
from sparselite.quantization.qat import learned_ranges
from sparselite.quantization.spec import quantize_weight
from sparselite.tflite import flatbuffer

log = logging.getLogger("sparselite")

# Post-training calibration runs the batch-1 graph once per example; this many give stable ranges.
MAX_CALIBRATION_EXAMPLES = 256


@dataclass
class ExportJob:
    """What one export reads, and what its stages have made so far."""

    module: nn.Module
    example_inputs: tuple
    path: Path
    report_path: Path | None
    options: ExportOptions
    verify_data: list[torch.Tensor] | None
    calibration_data: list[torch.Tensor]
    verify_labels: torch.Tensor | None = None  # the verify batches' class labels, when known
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    train_sparsity: dict[str, float] = field(default_factory=dict)  # pruned layer -> sparsity in training
    float_model: nn.Module | None = None
    precisions: dict[str, str] = field(default_factory=dict)  # weight layer -> precision (files not fully int8)
    model_t: Any = None  # the flatbuffer, object API
    injection: Any = None  # how each range was set (ranges.RangeInjection)
    kept_float: frozenset[str] = frozenset()
    output_scale: float = 1.0
    layer_tensors: dict[str, str] = field(default_factory=dict)  # pruned layer -> its weight tensor's name
    dense: bytes = b""
    final: bytes = b""
    report: ExportReport | None = None
    float_file: bytes = b""  # the fp32 conversion, made once for every float-activation file of the export
    choice: PrecisionChoice | None = None  # precision='auto': what was measured and chosen


def prepare(job: ExportJob) -> ExportJob:
    job.path = check_destination(job.path, job.report_path, size_bound(job.module))  # before minutes of work
    if job.options.precision is None:  # as trained: the precision QAT simulated, else the fully int8 file
        job.options = replace(job.options, precision=simulated_precision(job.module) or "int8")
    job.ranges = learned_ranges(job.module)
    job.train_sparsity = {name: float((target.weight == 0).float().mean())
                          for name, target in masked_targets(job.module).items()}
    job.float_model = float_model_for_export(job.module)
    if job.options.precision not in ("auto", "int8"):
        job.precisions = _float_layers(job.float_model, job.options.precision)  # refusals before conversion
    if job.verify_data is not None:
        _check_verifiable(job.float_model, job.example_inputs)
        examples = sum(len(batch) for batch in job.verify_data)
        if job.verify_labels is not None and len(job.verify_labels) != examples:
            raise SparseliteError(f"verify_labels has {len(job.verify_labels)} labels for {examples} verification "
                                  "examples; give one class index per example, batch for batch")
    elif job.options.precision == "auto":
        raise SparseliteError("precision='auto' measures accuracy on verification batches: pass verify_data "
                              "(or a datamodule with a validation or test split to sparselite export)")
    job.calibration_data = _cap_examples(job.calibration_data, MAX_CALIBRATION_EXAMPLES)
    if job.options.int8_file and not job.ranges and not job.calibration_data:
        raise SparseliteError("the model has no QAT ranges and no calibration batches were given; "
                              "pass calibration_data=[...] (a few batches)")
    if job.options.int8_file:
        log.info("quantizing with %d learned ranges, %d calibration batches", len(job.ranges), len(job.calibration_data))
    return job


def choose(job: ExportJob) -> ExportJob:
    if job.options.precision != "auto":
        return job
    has_ranges = bool(job.ranges or job.calibration_data)
    job.choice = choose_precision(job.float_model, lambda precision: _candidate_file(job, precision),
                                  (lambda: _candidate_file(job, "int8")[0]) if has_ranges else None,
                                  job.verify_data, job.verify_labels, job.options.max_accuracy_drop)
    for line in job.choice.table().splitlines():
        log.info("%s", line)
    job.options = job.options.with_choice(job.choice.to_dict())
    job.precisions = _float_layers(job.float_model, job.options.precision)
    return job


def _float_layers(float_model: nn.Module, precision) -> dict[str, str]:
    """Each float-activation layer's precision: every weight layer's, but none in the fully int8 file
    and only the layers a mapping names in an int8 file that keeps some float."""
    if precision == "int8":
        return {}
    return {layer: chosen for layer, chosen in layer_precisions(float_model, precision).items() if chosen != "int8"}


def _candidate_file(job: ExportJob, precision) -> tuple[bytes, dict[str, str]]:
    """The file ``convert`` and ``rewrite`` make of ``precision`` (the fully int8 one keeps float what
    XNNPACK lacks int8 for), and the precision each layer got; the fp32 conversion is kept for the next."""
    options = replace(job.options, precision=precision, float_fallback="xnnpack" if is_int8_file(precision) else False)
    candidate = replace(job, options=options, float_model=detached_copy(job.float_model), choice=None,
                        precisions=_float_layers(job.float_model, precision))
    candidate = rewrite(convert(candidate))
    job.float_file = job.float_file or candidate.float_file
    return candidate.dense, candidate.report.layer_precisions


def convert(job: ExportJob) -> ExportJob:
    if not job.options.int8_file:
        job.float_file = job.float_file or convert_float(job.float_model, job.example_inputs)
        job.model_t = flatbuffer.read_model(job.float_file)
        job.report = _new_report(job, [])
        return job
    fallback = job.options.float_fallback

    def convert_keeping_float(float_modules: frozenset[str] = frozenset()):
        return convert_with_ranges(job.float_model, job.example_inputs, job.ranges, job.calibration_data,
                                   float_modules, strict=not fallback)

    converted, timings = convert_keeping_float(), ""
    if fallback == "xnnpack":
        converted, job.kept_float, left_out, timings = keep_float_where_xnnpack_lacks_int8(
            convert_keeping_float, job.float_model, converted, job.options.require_gpu)
    else:  # still worth a note: an int8 op XNNPACK does not take runs on TFLite's kernels
        left_out = int8_ops_xnnpack_leaves_out(converted[0], job.float_model, job.options.require_gpu)
    job.model_t, job.injection = converted
    job.output_scale = _output_scale(job.model_t)
    job.layer_tensors = _match_layers(job.model_t, job.float_model, list(job.train_sparsity))
    job.report = _new_report(job, xnnpack_fallback_notes(job.kept_float, left_out, timings))
    return job


def rewrite(job: ExportJob) -> ExportJob:
    renamed = use_module_names(job.model_t)
    if job.options.int8_file:
        job.layer_tensors = {layer: renamed.get(tensor, tensor) for layer, tensor in job.layer_tensors.items()}
        job.report.float_islands = float_islands(job.model_t)
        if job.report.float_islands and not job.options.float_fallback:
            raise SparseliteError(islands_error(job.report.float_islands))
    use_xnnpack_forms(job.model_t, keep_weights_constant=job.options.require_gpu)
    on_tflite = large_depthwise_convs_on_tflite(job.model_t)
    if on_tflite:
        job.report.notes.append(f"{len(on_tflite)} depthwise conv(s) of more than 25 taps run on TFLite's own kernel, "
                                "2-13x faster than XNNPACK 2.3's there (docs/upstream/xnnpack_large_depthwise.md): "
                                + ", ".join(on_tflite))
    if job.precisions:  # every layer of a float-activation file; in an int8 file, the float ones it names
        written = apply_precisions(job.model_t, job.precisions, LayerFinder(job.float_model, job.precisions))
        job.report.layer_precisions = written
        if job.options.int8_file and (int8 := sorted(set(job.precisions) - set(written))):
            job.report.notes.append(f"layers named for {sorted(set(job.precisions.values()))} that the int8 file holds in "
                                    f"int8 (they are float only in its float islands): {', '.join(int8[:6])}")
        kept = {layer: f"{chosen} asked, {written[layer]} written" for layer, chosen in job.precisions.items()
                if layer in written and written[layer] != chosen}
        if kept:  # e.g. a conv the converter writes as DEPTHWISE_CONV_2D, which has no dynamic-range kernel
            job.report.notes.append(f"layers whose op has no kernel for the precision asked: {kept}")
        job.layer_tensors = _match_layers(job.model_t, job.float_model, list(job.train_sparsity))
    if job.options.int8_file and job.options.io_dtype == "float32":
        use_float_io(job.model_t)
    from sparselite.export.quantization_sharing import share_quantization_tables

    job.dense = share_quantization_tables(flatbuffer.write_model(job.model_t))
    job.report.dense_int8_bytes = len(job.dense)
    return job


def encode(job: ExportJob) -> ExportJob:
    report, job.final = job.report, job.dense
    if job.options.sparse and job.options.require_gpu:
        report.notes.append("sparse encoding skipped for require_gpu: LiteRT's GPU accelerator has no DENSIFY op, "
                            "so a sparse file runs only with CPU fallback")
    if job.options.sparse_storage:
        from sparselite.export.sparse_storage import encode_sparse

        # Also for models whose masks were stripped: the pass keeps every tensor that would not shrink dense.
        # Every precision: int8 and float weights get a DENSIFY, dynamic-range ones stay dense (sparse_storage.py).
        job.final, encodings = encode_sparse(job.dense)
        report.sparse_encoding = [e.to_dict() for e in encodings]
        if any(e.reason.startswith("dynamic-range") for e in encodings):
            report.notes.append("dynamic-range weights stay dense: XNNPACK 2.3 does not delegate a dynamic-range "
                                "CONV_2D or FULLY_CONNECTED fed by DENSIFY (docs/upstream/xnnpack_hybrid_conv_densify.md); "
                                "their zeros still shrink the compressed file")
    if any(e["encoding"] != "dense" for e in report.sparse_encoding):
        report.notes.append(
            "sparse storage shrinks the file; it does not speed up XNNPACK on x86, which densifies weights at "
            "load and runs dense kernels (XNNPACK's sparse kernels are fp32/fp16, ARM only)"
        )
    if report.float_islands:
        time_islands(report, job.dense)
    report.file_bytes = len(job.final)
    report.xz_bytes = len(lzma.compress(job.final, preset=9))
    report.dense_int8_xz_bytes = report.xz_bytes if job.final == job.dense else len(lzma.compress(job.dense, preset=9))
    _report_sparsity(job)
    return job


def verify(job: ExportJob) -> ExportJob:
    """On a candidate file in a temporary folder: nothing at ``path`` changes before the file passes."""
    options, report = job.options, job.report
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / job.path.name
        candidate.write_bytes(job.final)
        if job.verify_data is not None:
            reference = None if options.int8_file else (
                precision_reference(detached_copy(job.float_model), job.report.layer_precisions),
                "simulated-precision")  # weights and dynamic-range inputs rounded as the file rounds them
            report.parity = verify_parity(job.module, candidate, job.verify_data, job.output_scale, reference,
                                          job.verify_labels)
            if job.verify_labels is not None:
                report.accuracy = _accuracies(job, report.parity)
            if report.parity.top1_agreement < options.min_agreement:
                measure_noise_floor(report.parity, candidate, job.verify_data)
            failure = gate_failure(report.parity, options.min_agreement)
            if failure:
                raise SparseliteError(failure)
        if options.gpu_check or options.require_gpu:
            _check_gpu(report, candidate, options.require_gpu)
    return job


def write(job: ExportJob) -> ExportJob:
    job.report.sha256 = sha256_hex(job.final)
    if job.report_path is None:
        flatbuffer.write_atomically(job.path, job.final)
    else:
        write_model_and_report(job.path, job.final, job.report.to_json().encode(), job.report_path)
    mark_written(job.path)  # evaluating or timing the file next needs no crash probe: sparselite wrote it
    return job


STAGES = (prepare, choose, convert, rewrite, encode, verify, write)
# What each stage's progress line says it is doing (``export_tflite`` logs one line per stage).
STAGE_TITLES = {
    "prepare": "trace the model, fold BN, read the learned ranges",
    "choose": "choose each layer's precision (precision='auto': measured)",
    "convert": "quantize and convert (litert-torch)",
    "rewrite": "rewrite the graph for XNNPACK and the layers' precisions",
    "encode": "encode sparse weights, read sparsity back from the file",
    "verify": "check the file against the torch model",
    "write": "write the file",
}


def _new_report(job: ExportJob, notes: list[str]) -> ExportReport:
    injection, precision = job.injection, job.options.precision
    if blocks := deploy_form_blocks(job.float_model):
        notes = [f"{len(blocks)} reparameterizable blocks exported in their deploy form (the one their reparameterize() or "
                 f"switch_to_deploy() gives): {shortened(blocks)}"] + notes
    if blocks := training_form_blocks(job.float_model):
        notes = [f"{len(blocks)} reparameterizable blocks exported in their training form, every branch: their norms had "
                 f"never run when pruning or QAT prepared the model (from scratch): {shortened(blocks)}; compress from "
                 "trained weights for one conv per block"] + notes
    precision = "auto" if job.choice else dict(precision) if not isinstance(precision, str) else precision
    choice = job.choice.to_dict() if job.choice else None
    if injection is None:  # a file that is not fully int8: no activation ranges
        return ExportReport(path=str(job.path), file_bytes=0, io_dtype=job.options.io_dtype, ranges_learned=0,
                            ranges_calibrated=0, notes=notes, precision=precision, precision_choice=choice)
    return ExportReport(path=str(job.path), file_bytes=0, io_dtype=job.options.io_dtype,
                        ranges_learned=len(injection.learned), ranges_calibrated=len(injection.calibrated),
                        ranges_derived=len(injection.derived), ranges_fixed=len(injection.fixed),
                        calibrated_ranges=dict(injection.calibrated) if job.ranges else {}, notes=notes,
                        precision=precision, precision_choice=choice)


@torch.no_grad()
def _accuracies(job: ExportJob, parity) -> dict:
    """Top-1 on the labelled verification batches: the fp32 model, the fake-quant model (QAT), the file."""
    fp32 = np.concatenate([job.float_model(batch).float().numpy() for batch in job.verify_data])
    accuracy = {"fp32": top1_accuracy(fp32, job.verify_labels), "file": parity.file_top1, "examples": len(job.verify_labels)}
    if parity.reference == "fake-quant":
        accuracy["fake_quant"] = parity.reference_top1
    return accuracy


def _check_gpu(report: ExportReport, candidate: Path, required: bool) -> None:
    from sparselite.runtime.gpu import gpu_compatibility

    report.gpu = gpu_compatibility(candidate)
    if not report.gpu.get("fully_accelerated") and any(o.get("op") == "DENSIFY" for o in report.gpu.get("unsupported_ops", [])):
        report.notes.append("the GPU accelerator cannot run DENSIFY: export with sparse=False (--no-sparse) for GPU deployment")
    if required and not report.gpu.get("fully_accelerated"):
        raise SparseliteError(f"require_gpu: the model does not run fully on the GPU: "
                              f"{report.gpu.get('error') or report.gpu.get('unsupported_ops')}")


def _cap_examples(batches: list[torch.Tensor], limit: int) -> list[torch.Tensor]:
    kept, count = [], 0
    for batch in batches:
        if count >= limit:
            break
        kept.append(batch[: limit - count])
        count += len(kept[-1])
    return kept


def _check_verifiable(float_model: nn.Module, example_inputs: tuple) -> None:
    """Verification runs the file in ``LiteRTModel``, which takes one input and one output: say so before
    the conversion (a forward of the example), not after it."""
    if len(example_inputs) != 1:
        raise SparseliteError(f"the parity check needs a model with one input, got {len(example_inputs)} example "
                              "inputs; pass verify_batches=None to skip the check, or wrap the model")
    with torch.no_grad():
        output = float_model(*example_inputs)
    if not isinstance(output, torch.Tensor):
        what = f"a dict with keys {sorted(map(str, output))}" if isinstance(output, dict) else type(output).__name__
        raise SparseliteError(f"the parity check needs a model with one tensor output, but forward returned {what}; "
                              "wrap the model so that forward returns the tensor to run on the device, or pass "
                              "verify_batches=None")


def _output_scale(model_t) -> float:
    subgraph = model_t.subgraphs[0]
    quant = subgraph.tensors[subgraph.outputs[0]].quantization
    return float(quant.scale[0]) if quant is not None and quant.scale is not None and len(quant.scale) else 1.0


def _match_layers(model_t, float_model: nn.Module, pruned: Sequence[str]) -> dict[str, str]:
    """Pruned torch weight -> the TFLite weight tensor holding exactly its int8 values, or its fp32 or fp16
    values (a layer a file keeps float, or a recurrent layer's gate matrix, which a fully int8 file keeps in
    a float island)."""
    subgraph = model_t.subgraphs[0]
    candidates = []  # (name, values): names are not unique (an int8 weight and an fp32 constant may share one)
    for tensor in subgraph.tensors:
        data = model_t.buffers[tensor.buffer].data
        dtype = {TensorType.INT8: np.int8, TensorType.FLOAT32: np.float32, TensorType.FLOAT16: np.float16}.get(tensor.type)
        if dtype is not None and data is not None and len(tensor.shape) in (2, 4):  # int8, fp32 and fp16 constants
            candidates.append((tensor.name.decode(), np.asarray(data, dtype=np.uint8).view(dtype).reshape(tensor.shape)))
    matches = {}
    for layer in pruned:
        weight = pruned_weight(float_model, layer).detach()
        for expected in (quantize_weight(weight).numpy(), weight.numpy(), weight.half().numpy()):
            # TFLite conv weights are OHWI; depthwise are [1, H, W, C].
            forms = [expected] if expected.ndim != 4 else [expected.transpose(0, 2, 3, 1), expected.transpose(1, 2, 3, 0)]
            found = next((name for name, values in candidates if values.dtype == expected.dtype
                          and any(_same_weight(values, f) for f in forms)), None)
            if found is not None:
                matches[layer] = found
                break
    return matches


def _same_weight(stored: np.ndarray, expected: np.ndarray) -> bool:
    """Equal, or for int8 weights equal but for a few exact halves the converter rounded the other way: at
    most 1 step apart, in at most 1% of the values."""
    if stored.shape != expected.shape:
        return False
    if stored.dtype != np.int8:
        return np.array_equal(stored, expected)
    differ = stored.astype(np.int16) - expected.astype(np.int16)
    return int(np.abs(differ).max(initial=0)) <= 1 and np.count_nonzero(differ) <= max(1, expected.size // 100)


def _report_sparsity(job: ExportJob) -> None:
    """Per-layer sparsity decoded from the final file's weights (sparse-encoded or dense)."""
    if not job.layer_tensors and not job.train_sparsity:
        return
    from sparselite.tflite.constant_values import weight_sparsity

    report, in_file = job.report, weight_sparsity(job.final)
    zeros = total = 0
    read = {layer: tensor for layer, tensor in job.layer_tensors.items() if tensor in in_file}  # conv/FC weights
    for layer, tensor in read.items():
        sparsity, count = in_file[tensor], pruned_weight(job.float_model, layer).numel()
        report.layers.append(LayerSparsity(layer, tensor, sparsity, job.train_sparsity.get(layer)))
        zeros, total = zeros + sparsity * count, total + count
    report.overall_sparsity_in_file = zeros / max(total, 1)
    missing = sorted(set(job.train_sparsity) - set(read))
    # A recurrent layer's gate matrix ('rnn.weight_hh_l0') has the precision of its layer ('rnn').
    floats = [layer for layer in missing
              if job.precisions.get(layer, job.precisions.get(layer.rpartition(".")[0])) in ("fp16", "fp32")]
    if floats:
        report.notes.append(f"pruned layers with float weights (their sparsity is not read from the file): {floats}")
    missing = [layer for layer in missing if layer not in floats]
    in_float = [layer for layer in missing if any(layer == m or layer.startswith(m + ".") for m in job.kept_float)]
    if in_float:
        report.notes.append(f"pruned layers kept float by float_fallback='xnnpack' (their sparsity is not read from "
                            f"the file): {in_float}")
    if missing := [layer for layer in missing if layer not in in_float]:
        report.notes.append(f"no int8 or fp32 weight in the file matched pruned layers {missing}")
