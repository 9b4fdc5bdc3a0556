"""QAT for files whose activations stay float: each weight layer trains on what its precision computes.

- ``dynamic_int8``: the weight fake-quantized per output channel (the grid export writes,
  ``spec.weight_scales``, with the fold of a following BatchNorm), and the input rounded per row as
  XNNPACK rounds it at run time (``dynamic_range.py``);
- ``fp16``: the weight rounded to fp16;
- ``fp32``: unchanged.
Gradients pass straight through the rounding. Linear and Conv2d layers are simulated whole; a GRU or
LSTM step by step as the file computes it (``recurrent_steps.py``), each step's input and hidden state
rounded per row in dynamic range.

The layers keep their parameters and classes (a parametrization of the weight would hide it from the
pruner's in-place masks): each simulated layer gets a forward of its own, an instance attribute that
``strip`` removes. The simulated precision is kept on the model (``simulated_precision``), and an
export that is not told otherwise follows it.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from sparselite.deploy_form import to_deploy_form
from sparselite.errors import SparseliteError
from sparselite.quantization.dynamic_range import dynamically_quantized, fake_quantize_rows, row_dims_of
from sparselite.quantization.fake_quant import WeightFakeQuant
from sparselite.quantization.fusion import chain_batchnorm, find_fused_chains
from sparselite.quantization.layer_precision import PrecisionSpec, check_precision, is_int8_file, layer_precisions
from sparselite.quantization.library_layers import SAME_AS_BASE, TF_SAME_PADDING, library_form, pad_tf_same
from sparselite.quantization.recurrent_steps import stepwise, steps_forward

SIMULATED_PRECISION = "sparselite_simulated_precision"  # attribute on the prepared model


def simulated_precision(model: nn.Module) -> PrecisionSpec | None:
    """The precision a model was prepared to train for by ``FloatActivationSimulator`` (None: not)."""
    return getattr(model, SIMULATED_PRECISION, None)


class FloatActivationSimulator:
    """Prepares a model for a float-activation precision and switches the rounding on at ``begin_step``.
    Has ``QuantizationSimulator``'s surface where callers share it (``model``, ``begin_step``, ``step``,
    ``strip``, ``op_sites_found``): there are no functional ops to find, activations stay float."""

    op_sites_found = True

    def __init__(self, precision: PrecisionSpec, begin_step: int = 0) -> None:
        check_precision(precision)
        if is_int8_file(precision) or precision == "auto":
            raise SparseliteError(f"precision={precision!r} is not a float-activation precision: 'int8' (and a mapping "
                                  "whose default is 'int8') trains with QuantizationSimulator; 'auto' is chosen at "
                                  "export (train for 'int8' or a float-activation mapping)")
        self.precision, self.begin_step = precision, begin_step
        self.layers: dict[str, str] = {}
        self.model: nn.Module | None = None
        self.simulated: list[str] = []  # the layers whose forward simulates their precision
        self.enabled = False

    def prepare(self, model: nn.Module, example_inputs: tuple | None = None) -> list[str]:
        """Resolve each layer's precision (refusals now, before training) and give the simulated layers
        their forward, once per model; returns the simulated layers. (``example_inputs``: unused, there
        are no functional ops to find.)"""
        if simulated_precision(model) is not None:
            return self.simulated
        self.model = model
        to_deploy_form(model)  # the convs the file holds, not a reparameterizable block's branches
        self.layers = layer_precisions(model, self.precision)
        batchnorms = {chain.producer: chain_batchnorm(model, chain) for chain in find_fused_chains(model) if chain.batchnorm}
        for name, chosen in self.layers.items():
            module = model.get_submodule(name)
            if chosen != "fp32" and stepwise(module):
                module.forward = types.MethodType(_simulated_steps(chosen, self), module)
                self.simulated.append(name)
                continue
            if chosen == "dynamic_int8" and row_dims_of(module) is None:
                continue  # the file keeps it fp32 (a one-channel conv is a DEPTHWISE_CONV_2D); so does training
            if chosen == "fp32" or not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            form = _form(module)
            if form is None:  # a library's subclass that computes something else: as in int8 QAT, left as it is
                continue
            weight_quant = WeightFakeQuant(batchnorms.get(name)) if chosen == "dynamic_int8" else None
            module.forward = types.MethodType(_simulated_forward(chosen, weight_quant, self, form == TF_SAME_PADDING), module)
            self.simulated.append(name)
        setattr(model, SIMULATED_PRECISION, self.precision)
        return self.simulated

    def step(self, global_step: int) -> None:
        self.enabled = global_step >= self.begin_step

    def strip(self) -> None:
        if self.model is not None:
            strip(self.model)


def _form(module: nn.Linear | nn.Conv2d) -> str | None:
    """How the layer computes against its torch base (``library_layers.library_form``): a library's conv that
    pads as TensorFlow's SAME is simulated on its padded input, as the file computes it after its PAD."""
    if type(module) in (nn.Linear, nn.Conv2d):
        return SAME_AS_BASE
    return library_form(module, nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d)


def _simulated_forward(precision: str, weight_quant: WeightFakeQuant | None, simulator: FloatActivationSimulator,
                       pads_tf_same: bool = False):
    def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if pads_tf_same:
            x = pad_tf_same(module, x)
        weight = module.weight
        if simulator.enabled:
            if precision == "dynamic_int8":
                x = dynamically_quantized(module, x)
                weight = weight_quant(weight)
            else:
                weight = _fp16_rounded(weight)
        if isinstance(module, nn.Linear):
            return F.linear(x, weight, module.bias)
        return module._conv_forward(x, weight, module.bias)

    forward.simulates = precision  # how ``strip`` knows it
    return forward


def _simulated_steps(precision: str, simulator: FloatActivationSimulator):
    """A GRU's or LSTM's forward, step by step, with its weights (and in dynamic range the inputs of its
    matrix products) rounded as the file stores (computes) them. A packed sequence keeps torch's kernel."""
    weight_quant = WeightFakeQuant()

    def forward(module: nn.Module, x, hx=None):
        if not simulator.enabled or isinstance(x, nn.utils.rnn.PackedSequence):
            return type(module).forward(module, x, hx)
        if precision == "dynamic_int8":
            return steps_forward(module, x, hx, round_rows=lambda v: fake_quantize_rows(v, (-1,)),
                                 weight_of=lambda _, weight: weight_quant(weight))
        return steps_forward(module, x, hx, weight_of=lambda _, weight: _fp16_rounded(weight))

    forward.simulates = precision
    return forward


def _fp16_rounded(weight: torch.Tensor) -> torch.Tensor:
    return weight + (weight.half().to(weight.dtype) - weight).detach()


def strip(model: nn.Module) -> None:
    """Remove the simulated forwards and the mark (also on a deep copy): the float model again."""
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if forward is not None and hasattr(getattr(forward, "__func__", None), "simulates"):
            del module.__dict__["forward"]
    if SIMULATED_PRECISION in model.__dict__:
        del model.__dict__[SIMULATED_PRECISION]
