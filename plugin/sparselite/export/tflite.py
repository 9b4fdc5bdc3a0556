"""``export_tflite``: a (pruned, QAT-trained) torch model -> a fully int8, verified ``.tflite``.

fold BN -> torch.export -> pt2e prepare (litert quantizer) -> learned ranges in -> convert_pt2e
-> litert-torch convert [-> again, with the modules XNNPACK cannot run in int8 kept float] -> int8
check (islands.py) -> float I/O -> sparse encoding -> verify on XNNPACK (parity.py) -> write.
"""

from __future__ import annotations

import logging
import lzma
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from ai_edge_litert.schema_py_generated import TensorType
from torch import nn

from sparselite.errors import SparseliteError
from sparselite.module_copy import detached_copy
from sparselite.tflite import flatbuffer
from sparselite.export.destination import check_destination, sha256_hex, size_bound, write_model_and_report
from sparselite.export.io import use_float_io
from sparselite.export.layout import use_xnnpack_forms
from sparselite.export.lowering import lower_for_litert
from sparselite.export.names import use_module_names
from sparselite.export.islands import (
    float_islands, float_ops_error, int8_ops_xnnpack_leaves_out, islands_error, keep_float_where_xnnpack_lacks_int8,
    time_islands, xnnpack_fallback_notes,
)
from sparselite.export.parity import gate_failure, measure_noise_floor, verify
from sparselite.export.ranges import quantize_pt2e
from sparselite.export.report import FLOAT_FALLBACKS, ExportReport, FloatFallback, LayerSparsity
from sparselite.pruning.pruner import MASK_BUFFER
from sparselite.quantization.fusion import batchnorm_as_depthwise, find_fused_chains, fold_batchnorm
from sparselite.quantization.qat import learned_ranges, strip_fake_quant
from sparselite.quantization.spec import quantize_weight

log = logging.getLogger("sparselite")

# Post-training calibration runs the batch-1 graph once per example; this many give stable ranges.
MAX_CALIBRATION_EXAMPLES = 256


def _untraceable_model_errors() -> tuple[type[BaseException], ...]:
    """What torch.export raises for a model it cannot trace (data-dependent control flow, unsupported
    Python): the user changes the model. Anything else from the quantization step is a bug here."""
    from torch._dynamo.exc import TorchDynamoException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    return TorchDynamoException, GuardOnDataDependentSymNode


def float_model_for_export(module: nn.Module) -> nn.Module:
    """A float copy: fake-quant and masks stripped, BN folded into convs (or a depthwise 1x1 conv where
    it follows none), eval mode."""
    model = detached_copy(module).eval()
    strip_fake_quant(model)
    for sub in model.modules():
        if MASK_BUFFER in sub._buffers:
            sub.weight.data.mul_(sub._buffers.pop(MASK_BUFFER))
    fold_batchnorm(model, find_fused_chains(model))
    batchnorm_as_depthwise(model)  # the BNs that follow no conv
    return model


def _cap_examples(batches: Iterable[torch.Tensor], limit: int) -> list[torch.Tensor]:
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
        raise SparseliteError(f"verify_batches needs a model with one input, got {len(example_inputs)} example inputs; "
                              "pass verify_batches=None to skip the parity check, or wrap the model")
    with torch.no_grad():
        output = float_model(*example_inputs)
    if not isinstance(output, torch.Tensor):
        what = f"a dict with keys {sorted(map(str, output))}" if isinstance(output, dict) else type(output).__name__
        raise SparseliteError(f"verify_batches needs a model with one tensor output, but forward returned {what}; wrap "
                              "the model so that forward returns the tensor to run on the device, or pass verify_batches=None")


def _quantize_and_convert(float_model: nn.Module, example_inputs: tuple, ranges, calibration: list[torch.Tensor],
                          float_modules: frozenset[str] = frozenset(), *, strict: bool = False):
    """The int8 flatbuffer (object API, converter's tensor names) and how each range was set. ``strict``:
    ops the quantizer leaves float are refused here, before calibration would be asked for them."""
    try:
        converted, quantizer, injection = quantize_pt2e(float_model, example_inputs, ranges, calibration, float_modules)
    except _untraceable_model_errors() as err:  # only the model's own problems; a sparselite bug keeps its traceback
        raise SparseliteError(f"torch.export cannot trace this model: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    if strict and injection.float_sources and not calibration:
        raise SparseliteError(float_ops_error(injection.float_sources))
    if injection.calibrated and not calibration:
        raise SparseliteError(
            f"{len(injection.calibrated)} activation range(s) were not learned in QAT (e.g. "
            f"{next(iter(injection.calibrated.values()))}) and no calibration batches were given; pass calibration=[...]"
        )

    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig

    try:
        edge = litert_torch.convert(converted, example_inputs, quant_config=QuantConfig(pt2e_quantizer=quantizer))
        data = edge.model_content()
    except Exception as err:
        raise SparseliteError(f"litert-torch could not convert the quantized model: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    return flatbuffer.read_model(data), injection


def _output_scale(model_t) -> float:
    subgraph = model_t.subgraphs[0]
    quant = subgraph.tensors[subgraph.outputs[0]].quantization
    return float(quant.scale[0]) if quant is not None and quant.scale is not None and len(quant.scale) else 1.0


def _match_layers(model_t, float_model: nn.Module, pruned: Sequence[str]) -> dict[str, str]:
    """Pruned torch layer -> the TFLite weight tensor holding exactly its int8 values."""
    subgraph = model_t.subgraphs[0]
    candidates = {}
    for tensor in subgraph.tensors:
        data = model_t.buffers[tensor.buffer].data
        if tensor.type == TensorType.INT8 and data is not None and len(tensor.shape) in (2, 4):  # int8 constants
            candidates[tensor.name.decode()] = np.asarray(data, dtype=np.uint8).view(np.int8).reshape(tensor.shape)
    matches = {}
    for layer in pruned:
        weight = float_model.get_submodule(layer).weight.detach()
        expected = quantize_weight(weight).numpy()
        if expected.ndim == 4:
            # TFLite conv weights are OHWI; depthwise are [1, H, W, C].
            ohwi = expected.transpose(0, 2, 3, 1)
            forms = [ohwi, ohwi.transpose(3, 1, 2, 0)]
        else:
            forms = [expected]
        for name, values in candidates.items():
            if any(values.shape == f.shape and np.array_equal(values, f) for f in forms):
                matches[layer] = name
                break
    return matches


def export_tflite(
    module: nn.Module,
    example_inputs: torch.Tensor | tuple,
    path: str | Path,
    *,
    io_dtype: str = "float32",
    calibration: Iterable[torch.Tensor] | None = None,
    verify_batches: Iterable[torch.Tensor] | None = None,
    min_agreement: float = 0.98,
    sparse: bool = True,
    gpu_check: bool = False,
    require_gpu: bool = False,
    float_fallback: FloatFallback = False,
    report_path: str | Path | None = None,
) -> ExportReport:
    """Export ``module`` (a LightningModule or a plain nn.Module) to a fully int8 ``.tflite`` at ``path``.

    Args:
        example_inputs: one input batch (its batch size is the model's); only shape and dtype matter.
        io_dtype: 'float32' (QUANTIZE/DEQUANTIZE inside the model) or 'int8'.
        calibration: input batches for post-training calibration of ranges QAT did not learn
            (all of them for a model trained without QAT).
        verify_batches: held-out input batches; the file is run on XNNPACK and compared with the
            torch model; below ``min_agreement`` top-1 agreement the export fails and writes nothing,
            unless the file agrees as well as XNNPACK and TFLite's builtin kernels agree with each
            other on it (``parity.gate_failure``).
        sparse: store pruned weights in TFLite's sparse format where that saves bytes.
        gpu_check / require_gpu: compile GPU-only and report unsupported ops; fail if not delegable.
        float_fallback: ops with no int8 TFLite kernel (GRU/LSTM cells, masked attention) stay in float
            in a mixed-precision file, listed in ``report.float_islands`` with their share of the
            latency; by default they fail the export, named once per op type with their torch modules.
            'xnnpack' also keeps float the modules whose int8 ops XNNPACK does not delegate
            (LayerNorm and attention in XNNPACK 2.3): faster on XNNPACK, and exact there.
        report_path: also write the report (JSON) there, with the model as one unit
            (``destination.write_model_and_report``).

    ``path`` is checked first (``destination.check_destination``): it must end in .tflite, be writable,
    not be a folder or an existing file other than a model, and have room for the file.
    ``report.sha256`` is the written file's.
    """
    if float_fallback not in FLOAT_FALLBACKS:
        raise SparseliteError(f"float_fallback={float_fallback!r} must be False, True or 'xnnpack'")
    if io_dtype not in ("float32", "int8"):
        raise SparseliteError(f"io_dtype='{io_dtype}' must be 'float32' or 'int8'")
    if not 0.0 <= min_agreement <= 1.0:
        raise SparseliteError(f"min_agreement={min_agreement} must be in [0, 1]")
    example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    path = check_destination(path, report_path, size_bound(module))  # before the minutes of work, not after
    ranges = learned_ranges(module)
    pruned = [name for name, sub in module.named_modules() if MASK_BUFFER in sub._buffers]
    train_sparsity = {name: float((module.get_submodule(name).weight == 0).float().mean()) for name in pruned}

    float_model = float_model_for_export(module)
    if verify_batches is not None:
        _check_verifiable(float_model, example_inputs)
    calibration = _cap_examples(calibration or [], MAX_CALIBRATION_EXAMPLES)
    if not ranges and not calibration:
        raise SparseliteError("the model has no QAT ranges and no calibration batches were given; pass calibration=[...] (a few batches)")
    log.info("quantizing with %d learned ranges, %d calibration batches", len(ranges), len(calibration))
    def convert(float_modules: frozenset[str] = frozenset()):
        return _quantize_and_convert(float_model, example_inputs, ranges, calibration, float_modules,
                                     strict=not float_fallback)

    (model_t, injection), kept_float, left_out, timings = convert(), frozenset(), [], ""
    if float_fallback == "xnnpack":
        (model_t, injection), kept_float, left_out, timings = keep_float_where_xnnpack_lacks_int8(
            convert, float_model, (model_t, injection))
    else:  # still worth a note: an int8 op XNNPACK does not take runs on TFLite's kernels
        left_out = int8_ops_xnnpack_leaves_out(model_t, float_model)
    output_scale = _output_scale(model_t)
    layer_tensors = _match_layers(model_t, float_model, pruned)
    renamed = use_module_names(model_t)
    layer_tensors = {layer: renamed.get(tensor, tensor) for layer, tensor in layer_tensors.items()}
    islands = float_islands(model_t)
    if islands and not float_fallback:
        raise SparseliteError(islands_error(islands))
    use_xnnpack_forms(model_t)
    if io_dtype == "float32":
        use_float_io(model_t)
    from sparselite.export.quantization_sharing import share_quantization_tables
    from sparselite.export.sparse import encode_sparse

    dense = share_quantization_tables(flatbuffer.write_model(model_t))

    report = ExportReport(path=str(path), file_bytes=0, io_dtype=io_dtype, float_islands=islands,
                          ranges_learned=len(injection.learned), ranges_calibrated=len(injection.calibrated),
                          ranges_derived=len(injection.derived), ranges_fixed=len(injection.fixed),
                          calibrated_ranges=dict(injection.calibrated) if ranges else {},
                          dense_int8_bytes=len(dense), notes=xnnpack_fallback_notes(kept_float, left_out, timings))
    final = dense
    if sparse and require_gpu:
        sparse = False
        report.notes.append("sparse encoding skipped for --require-gpu: LiteRT's GPU accelerator has no DENSIFY op, "
                            "so a sparse file runs only with CPU fallback")
    if sparse:
        # Also for models whose masks were stripped: the pass keeps every tensor that would not shrink dense.
        final, encodings = encode_sparse(dense)
        report.sparse_encoding = [e.to_dict() for e in encodings]
    if any(e["encoding"] != "dense" for e in report.sparse_encoding):
        report.notes.append(
            "sparse storage shrinks the file; it does not speed up XNNPACK on x86, which densifies weights at "
            "load and runs dense int8 kernels (XNNPACK's sparse kernels are fp32/fp16, ARM only)"
        )
    if islands:
        time_islands(report, dense)
    report.file_bytes = len(final)
    report.xz_bytes = len(lzma.compress(final, preset=9))
    report.dense_int8_xz_bytes = report.xz_bytes if final == dense else len(lzma.compress(dense, preset=9))
    _report_sparsity(report, final, layer_tensors, train_sparsity, float_model, kept_float)

    # Verify on the runtime before the file replaces anything at ``path``.
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / path.name
        candidate.write_bytes(final)
        if verify_batches is not None:
            verify_batches = list(verify_batches)  # read twice when the noise floor is measured
            report.parity = verify(module, candidate, verify_batches, output_scale)
            if report.parity.top1_agreement < min_agreement:
                measure_noise_floor(report.parity, candidate, verify_batches)
            failure = gate_failure(report.parity, min_agreement)
            if failure:
                raise SparseliteError(failure)
        if gpu_check or require_gpu:
            from sparselite.runtime.gpu import gpu_compatibility

            report.gpu = gpu_compatibility(candidate)
            if not report.gpu.get("fully_accelerated") and any(o.get("op") == "DENSIFY" for o in report.gpu.get("unsupported_ops", [])):
                report.notes.append("the GPU accelerator cannot run DENSIFY: export with sparse=False (--no-sparse) for GPU deployment")
            if require_gpu and not report.gpu.get("fully_accelerated"):
                raise SparseliteError(f"--require-gpu: the model does not run fully on the GPU: {report.gpu.get('error') or report.gpu.get('unsupported_ops')}")
    report.sha256 = sha256_hex(final)
    if report_path is None:
        flatbuffer.write_atomically(path, final)
    else:
        write_model_and_report(path, final, report.to_json().encode(), report_path)
    return report


def _report_sparsity(report: ExportReport, data: bytes, layer_tensors: dict[str, str],
                     train_sparsity: dict[str, float], float_model: nn.Module, kept_float: frozenset[str]) -> None:
    """Per-layer sparsity decoded from the final file's weights (sparse-encoded or dense)."""
    if not layer_tensors:
        return
    from sparselite.tflite.sparse import weight_sparsity

    in_file = weight_sparsity(data)
    zeros = total = 0
    for layer, tensor in layer_tensors.items():
        sparsity, count = in_file[tensor], float_model.get_submodule(layer).weight.numel()
        report.layers.append(LayerSparsity(layer, tensor, sparsity, train_sparsity.get(layer)))
        zeros, total = zeros + sparsity * count, total + count
    report.overall_sparsity_in_file = zeros / max(total, 1)
    missing = sorted(set(train_sparsity) - set(layer_tensors))
    in_float = [layer for layer in missing if any(layer == m or layer.startswith(m + ".") for m in kept_float)]
    if in_float:
        report.notes.append(f"pruned layers kept float by float_fallback='xnnpack' (their sparsity is not read from "
                            f"the file): {in_float}")
    if missing := [layer for layer in missing if layer not in in_float]:
        report.notes.append(f"no int8 weight in the file matched pruned layers {missing}")


def export_float_tflite(module: nn.Module, example_inputs: torch.Tensor | tuple, path: str | Path) -> int:
    """The fp32 baseline file (BN folded, no quantization), for size and latency comparisons. Returns bytes."""
    import litert_torch

    example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    float_model = float_model_for_export(module)
    try:
        exported = torch.export.export(float_model, example_inputs).module()
        if lower_for_litert(exported):  # else the eager model, as before: the fp32 baseline keeps its exact form
            float_model = exported
        data = litert_torch.convert(float_model, example_inputs).model_content()
    except Exception as err:
        raise SparseliteError(f"litert-torch could not convert the float model: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    model_t = flatbuffer.read_model(data)
    if use_xnnpack_forms(model_t):  # as in the int8 export: their latency ratio compares quantization only
        data = flatbuffer.write_model(model_t)
    flatbuffer.write_atomically(path, data)
    return len(data)
