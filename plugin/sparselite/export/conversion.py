"""torch -> TFLite flatbuffer: the float model export starts from, and its two conversions (int8 with the
learned ranges, and the fp32 baseline)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sparselite.deploy_form import to_deploy_form
from sparselite.errors import SparseliteError
from sparselite.export.islands import float_ops_error
from sparselite.export.xnnpack_forms import use_xnnpack_forms
from sparselite.export.lowering import lower_for_litert
from sparselite.export.ranges import quantize_pt2e
from sparselite.module_copy import detached_copy
from sparselite.pruning.targets import strip_masks
from sparselite.quantization.fusion import batchnorm_as_depthwise, find_fused_chains, fold_batchnorm
from sparselite.quantization.float_activations import strip as strip_float_activation_quant
from sparselite.quantization.qat import strip_fake_quant
from sparselite.tflite import flatbuffer


def float_model_for_export(module: nn.Module) -> nn.Module:
    """A float copy: fake-quant and masks stripped, BN folded into convs (or a depthwise 1x1 conv where
    it follows none), reparameterizable blocks in their deploy form (``deploy_form.py``), eval mode."""
    model = detached_copy(module).eval()
    to_deploy_form(model)  # a model trained without sparselite's callbacks; else already done, and kept
    strip_fake_quant(model)
    strip_float_activation_quant(model)
    strip_masks(model)
    fold_batchnorm(model, find_fused_chains(model))
    batchnorm_as_depthwise(model)  # the BNs that follow no conv
    return model


def _untraceable_model_errors() -> tuple[type[BaseException], ...]:
    """What torch.export raises for a model it cannot trace (data-dependent control flow, unsupported
    Python): the user changes the model. Anything else from the quantization step is a bug here."""
    from torch._dynamo.exc import TorchDynamoException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    return TorchDynamoException, GuardOnDataDependentSymNode


def convert_with_ranges(float_model: nn.Module, example_inputs: tuple, ranges, calibration: list[torch.Tensor],
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
            f"{next(iter(injection.calibrated.values()))}) and no calibration batches were given; pass calibration_data=[...]"
        )

    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig

    try:
        edge = litert_torch.convert(converted, example_inputs, quant_config=QuantConfig(pt2e_quantizer=quantizer))
        data = edge.model_content()
    except Exception as err:
        raise SparseliteError(f"litert-torch could not convert the quantized model: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    return flatbuffer.read_model(data), injection


def convert_float(float_model: nn.Module, example_inputs: tuple) -> bytes:
    """The fp32 .tflite bytes of a float model, as the converter writes them."""
    import litert_torch

    try:
        exported = torch.export.export(float_model, example_inputs).module()
        if lower_for_litert(exported):  # a model with nothing to lower converts from its eager form
            float_model = exported
        data = litert_torch.convert(float_model, example_inputs).model_content()
    except Exception as err:
        raise SparseliteError(f"litert-torch could not convert the float model: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    return data


def export_float_tflite(module: nn.Module, example_inputs: torch.Tensor | tuple, path: str | Path,
                        keep_weights_constant: bool = False) -> int:
    """The fp32 baseline file (BN folded, no quantization), for size and latency comparisons. Returns bytes.
    ``keep_weights_constant``: the forms of a ``require_gpu`` export (``xnnpack_forms.use_xnnpack_forms``)."""
    example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    data = convert_float(float_model_for_export(module), example_inputs)
    model_t = flatbuffer.read_model(data)
    if use_xnnpack_forms(model_t, keep_weights_constant):  # as in the int8 export: their latency ratio compares quantization only
        data = flatbuffer.write_model(model_t)
    flatbuffer.write_atomically(path, data)
    return len(data)
