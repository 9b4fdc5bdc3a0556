"""Quantization-aware training without Lightning: prepare, step, strip.

Eager fake-quant (not a pt2e GraphModule): the model stays a normal nn.Module, so train()/eval(),
checkpoints and DDP behave as usual. State lives in submodules named ``sparselite_*``:
  - ``<conv|linear>.sparselite_weight_quant``: per-channel fake-quant of the (unfolded) weight (per
    output channel: dim 1 of a transposed conv's);
  - ``<conv|linear>.sparselite_bias_quant``: in eval mode, the int32 rounding of the (folded) bias,
    where the layer's whole int8 arithmetic is not computed as the file's (``int8_layer.py``: an input
    on no learned grid);
  - ``<conv|linear>.sparselite_output_quant``: the range of the fused op's output, observed after BN
    and activation (a forward hook on the chain's last module applies it); one module, shared, for the
    convs whose outputs a BN reads concatenated (``fusion.FusedChain.channels``);
  - ``<activation>.sparselite_output_quant``: the output of an activation TFLite requantizes
    (Hardswish, SiLU, ...) that no chain fuses;
  - ``<batchnorm>.sparselite_output_quant`` and ``.sparselite_bias_quant``, for a BatchNorm2d that
    follows no conv (a depthwise 1x1 conv in the file, ``fusion.py``): its output after its activation,
    and in eval mode its shift on that conv's int32 bias grid;
  - ``<root>.sparselite_op_quant.<module path, '/' for '.'>/<op>_<i>``: the outputs of functional ops
    (add, mul, cat, ...) called in that module's forward (``functional_ops.py``);
  - ``<root>.sparselite_input_quant``: the range of the model input.
Per-channel symmetric weight quantization is invariant to BN's per-channel scale, so fake-quant of
the unfolded weight gives the same int8 values as the folded weight exported later.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparselite.deploy_form import to_deploy_form
from sparselite.errors import SparseliteError
from sparselite.hook_ids import hook_ids_apart
from sparselite.quantization.fake_quant import (
    NORM_SLICE_ATTR, ActivationFakeQuant, BatchNormShiftFakeQuant, BiasFakeQuant, GridFakeQuant, WeightFakeQuant,
)
from sparselite.quantization.fusion import FusedChain, chain_batchnorm, find_fused_chains
from sparselite.quantization.library_layers import TF_SAME_PADDING, library_form, pad_tf_same
from sparselite.quantization.spec import depthwise_on_tflite_kernel
from sparselite.quantization.int8_layer import Compute, int8_output, normalization_int8_output, with_float_gradient
from sparselite.quantization.functional_ops import (
    HOOK_FUNCTIONS, LOAD_HOOK_FUNCTIONS, OP_QUANT, attach_op_sites, op_sites_from_state_dict,
)

WEIGHT_QUANT = "sparselite_weight_quant"
BIAS_QUANT = "sparselite_bias_quant"
OUTPUT_QUANT = "sparselite_output_quant"
INPUT_QUANT = "sparselite_input_quant"


def _forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, compute: Compute, channel_dim: int,
             tflite_kernel: bool = False) -> torch.Tensor:
    """Training: float sums of the fake-quantized weight. Eval: the int8 file's arithmetic where it is
    known (``int8_layer``), else the float sums with the int32 bias's rounding. ``weight``: output
    channels first (``compute`` takes it so). ``tflite_kernel``: the file runs it on TFLite's kernel."""
    weight_quant = getattr(layer, WEIGHT_QUANT)
    as_file = None
    if not layer.training and weight_quant.enabled:
        as_file = int8_output(x, weight, layer.bias, weight_quant.batchnorm, layer._modules.get(OUTPUT_QUANT),
                              compute, channel_dim, tflite_kernel)
    if as_file is not None and not torch.is_grad_enabled():
        return as_file
    out = compute(x, weight_quant(weight), layer.bias)
    if as_file is not None:
        return with_float_gradient(out, as_file)
    return getattr(layer, BIAS_QUANT)(out, x, weight, layer.bias, channel_dim)


def on_tflite_depthwise_kernel(conv: nn.Conv1d | nn.Conv2d, x: torch.Tensor, padded_before: bool) -> bool:
    """Whether the file runs ``conv`` on TFLite's depthwise kernel (``spec.depthwise_on_tflite_kernel``):
    one output channel per input channel, and more taps than XNNPACK runs fast once export has cropped
    what only reads padding. A Conv1d is a conv of one row in the file. ``padded_before``: the input was
    padded by the module itself (no SAME padding)."""
    dims = len(conv.kernel_size)
    if not (conv.groups == conv.in_channels == conv.out_channels > 1) or x.dim() != dims + 2:
        return False
    kernel = tuple(conv.kernel_size)
    same_padding = (not padded_before and conv.padding_mode == "zeros" and all(s == 1 for s in conv.stride)
                    and all(d == 1 for d in conv.dilation) and all(k % 2 == 1 for k in kernel)
                    and conv.padding in ("same", tuple(k // 2 for k in kernel)))
    size = tuple(x.shape[2:])
    if dims == 1:
        kernel, size = (1, *kernel), (1, *size)
    return depthwise_on_tflite_kernel(kernel, size, cropped=same_padding)


class _QATConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _forward(self, x, self.weight, self._conv_forward, 1, on_tflite_depthwise_kernel(self, x, padded_before=False))


class _QATConv1d(nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _forward(self, x, self.weight, self._conv_forward, 1, on_tflite_depthwise_kernel(self, x, padded_before=False))


class _QATConv2dSame(nn.Conv2d):
    """A conv that pads as TensorFlow's SAME from its input's size (``library_layers``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_tf_same(self, x)
        return _forward(self, x, self.weight, self._conv_forward, 1, on_tflite_depthwise_kernel(self, x, padded_before=True))


class _QATLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _forward(self, x, self.weight, F.linear, -1)


class _QATConvTranspose(nn.modules.conv._ConvTransposeNd):
    """A transposed conv's weight is [in, out, k...]: its output channels, which TFLite's TRANSPOSE_CONV
    quantizes per channel, are dim 1 (groups == 1 only: ``_quantizable``)."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        dims = x.dim() - 2
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, dims, self.dilation)
        transposed_conv = F.conv_transpose2d if dims == 2 else F.conv_transpose1d

        def compute(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            return transposed_conv(inputs, weight.transpose(0, 1), bias, self.stride, self.padding, output_padding,
                                   self.groups, self.dilation)

        return _forward(self, x, self.weight.transpose(0, 1), compute, 1)


class _QATConvTranspose1d(_QATConvTranspose, nn.ConvTranspose1d):
    pass


class _QATConvTranspose2d(_QATConvTranspose, nn.ConvTranspose2d):
    pass


_QAT_CLASSES = {nn.Conv1d: _QATConv1d, nn.Conv2d: _QATConv2d, nn.Linear: _QATLinear,
                nn.ConvTranspose1d: _QATConvTranspose1d, nn.ConvTranspose2d: _QATConvTranspose2d}
# Modules whose int8 TFLite form requantizes (own output range), unless fused into a conv chain.
REQUANTIZING_MODULES = (nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.PReLU, nn.LayerNorm)
_FLOAT_CLASSES = {v: k for k, v in _QAT_CLASSES.items()}


def _quantizable(module: nn.Module) -> bool:
    """An nn.Conv1d/2d, nn.Linear, or a transposed conv without groups (whose per-output-channel weight
    scales span the groups' blocks of dim 1), or a library's subclass of one that computes the same."""
    if _qat_class(module) is None:
        return False
    return not isinstance(module, nn.modules.conv._ConvTransposeNd) or module.groups == 1


def _qat_class(module: nn.Module) -> type | None:
    """The class QAT gives ``module``: its torch class's, or, for a library's subclass that computes what
    its torch base computes (``library_layers``), one with QAT's forward over the subclass, which
    ``strip_fake_quant`` turns back into the subclass. None for a module QAT cannot follow."""
    cls = type(module)
    if cls in _QAT_CLASSES or cls in _FLOAT_CLASSES:
        return _QAT_CLASSES.get(cls, cls)
    base = next((b for b in _QAT_CLASSES if isinstance(module, b)), None)
    form = library_form(module, base) if base is not None else None
    if form is None:
        return None
    if (cls, form) not in _SUBCLASS_QAT:
        qat_base = _QATConv2dSame if form == TF_SAME_PADDING else _QAT_CLASSES[base]
        qat = type(f"_QAT_{cls.__name__}", (qat_base, cls), {"__module__": __name__})
        _SUBCLASS_QAT[(cls, form)] = qat
        _FLOAT_CLASSES[qat] = cls
    return _SUBCLASS_QAT[(cls, form)]


_SUBCLASS_QAT: dict[tuple[type, str], type] = {}


def _quantize_output(quant: ActivationFakeQuant, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return quant(output)


def _shift_on_int32_grid(quant: BatchNormShiftFakeQuant, module: nn.BatchNorm2d, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """A BatchNorm2d that follows no conv: in eval mode, the depthwise 1x1 conv export writes for it, as
    the int8 file computes it (``int8_layer``), or its shift on the int32 bias grid."""
    if not module.training and quant.enabled:
        as_file = normalization_int8_output(inputs[0], module, module._modules.get(OUTPUT_QUANT))
        if as_file is not None:
            return with_float_gradient(output, as_file)
    return quant(output, inputs[0])


def _remember_input(quant: BatchNormShiftFakeQuant, module: nn.BatchNorm2d, args: tuple) -> None:
    """A norm+activation module's input, for ``_shift_before_activation`` (its activation's input is
    the norm's output, which the shift is simulated on)."""
    quant.__dict__["norm_input"] = args[0] if args else None


def _shift_before_activation(quant: BatchNormShiftFakeQuant, module: nn.Module, args: tuple) -> tuple | None:
    """``_shift_on_int32_grid`` of the norm's output, as the activation inside its module reads it."""
    norm_input = quant.__dict__.pop("norm_input", None)
    if norm_input is None or not args:
        return None
    return (_shift_on_int32_grid(quant, quant.normalization, (norm_input,), args[0]), *args[1:])


def _mark_norm_slice(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    """A producer whose output is a slice of what its BN reads: the concatenation of the slices is no
    point of the file (its convs write the BN's output, folded), so ``functional_ops`` leaves it unrounded."""
    setattr(output, NORM_SLICE_ATTR, True)


def _quantize_input(quant: ActivationFakeQuant, module: nn.Module, args: tuple) -> tuple | None:
    if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
        return (quant(args[0]), *args[1:])
    return None


# Each batch's weight in the moving-average ranges when QAT never freezes: the ranges follow the last
# ~300 batches.
OPEN_ENDED_AVERAGING_CONSTANT = 0.01


def default_averaging_constant(begin_step: int, freeze_step: int | None) -> float:
    """3 / (the QAT window's steps), so the moving-average ranges settle within the window: after it, the
    ranges' starting values weigh (1 - 3/n)^n < e^-3 = 5%. A constant does not fit every window: 0.01 over
    a 40-step window leaves two thirds of the first batch's range at the freeze, the logits clip, and the
    int8 model loses points while "agreeing" with an equally clipped fake-quant model. A 300-step window
    gets 0.01."""
    if freeze_step is None:
        return OPEN_ENDED_AVERAGING_CONSTANT
    return min(1.0, 3.0 / (freeze_step - begin_step))


class QuantizationSimulator:
    """Inserts TFLite-int8 fake-quant into a float model and drives its phases."""

    def __init__(self, begin_step: int = 0, freeze_step: int | None = None,
                 averaging_constant: float | None = None) -> None:
        if begin_step < 0:
            raise SparseliteError(f"begin_step={begin_step} must be >= 0")
        if freeze_step is not None and freeze_step <= begin_step:
            raise SparseliteError(
                f"freeze_step={freeze_step} must be after begin_step={begin_step}; ranges need steps to settle"
            )
        if averaging_constant is None:
            averaging_constant = default_averaging_constant(begin_step, freeze_step)
        if not 0.0 < averaging_constant <= 1.0:
            raise SparseliteError(f"averaging_constant={averaging_constant} must be in (0, 1]")
        self.begin_step = begin_step
        self.freeze_step = freeze_step
        self.averaging_constant = averaging_constant
        self.chains: list[FusedChain] = []
        self.model: nn.Module | None = None
        self.op_sites: list[str] = []
        self.op_sites_found = False  # the functional-op call sites have been looked for (one forward)
        self.grid = GridFakeQuant()  # rounds the ops the file computes on fixed or derived grids (int8_rounding.py)

    def prepare(self, model: nn.Module, example_inputs: tuple | None = None) -> list[FusedChain]:
        """Attach fake-quant to every conv/linear (exact nn.Conv1d/2d, nn.ConvTranspose1d/2d, nn.Linear), every requantizing
        activation, and the model input; with ``example_inputs``, also to functional ops (add, mul, cat).
        Without them, ``find_op_sites`` finds those with the first batch; a checkpoint's op-site ranges
        load before that (their fake-quants are made from the state_dict's keys)."""
        if self.model is not None:
            return self.chains
        to_deploy_form(model)  # the convs the file holds, not a reparameterizable block's branches
        with hook_ids_apart(model):  # a pickled copy keeps its hooks when new ones come (hook_ids.py)
            return self._attach(model, example_inputs)

    def _attach(self, model: nn.Module, example_inputs: tuple | None) -> list[FusedChain]:
        found = find_fused_chains(model)
        chains = [c for c in found if _quantizable(model.get_submodule(c.producer))]
        # BatchNorms that follow no conv: export writes each as a depthwise 1x1 conv (fusion.py), whose
        # output, after its activation, is one int8 tensor. In training they normalize with batch
        # statistics, as the BNs folded into convs do, so only that output is fake-quantized.
        normalizations = [c for c in found if isinstance(model.get_submodule(c.producer), nn.BatchNorm2d)]
        if not chains:
            raise SparseliteError("QAT found no nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d/2d or nn.Linear to quantize in the model")
        if isinstance(model, nn.Sequential):
            raise SparseliteError("QAT attaches its input fake-quant to the root module, which an nn.Sequential would run "
                                  "as a last layer: wrap the nn.Sequential in a module of its own (e.g. ImageClassifier)")
        tails = {c.output_module for c in chains + normalizations}
        for chain in normalizations:
            self._attach_normalization(model, chain)
        shared: dict[str, ActivationFakeQuant] = {}  # the BN a concatenation of producers folds into -> its range
        for chain in chains:
            producer = model.get_submodule(chain.producer)
            batchnorm = chain_batchnorm(model, chain)
            producer.add_module(WEIGHT_QUANT, WeightFakeQuant(batchnorm))
            producer.add_module(BIAS_QUANT, BiasFakeQuant(batchnorm))
            producer.__class__ = _qat_class(producer)
            if chain.channels is not None:  # its output is a slice of the concatenation the BN reads (fusion.py)
                producer.register_forward_hook(functools.partial(_mark_norm_slice))
                if chain.batchnorm in shared:  # one range for the concatenation's producers, hooked once
                    producer.add_module(OUTPUT_QUANT, shared[chain.batchnorm])
                    continue
            producer.add_module(OUTPUT_QUANT, ActivationFakeQuant(self.averaging_constant))
            if chain.channels is not None:
                shared[chain.batchnorm] = getattr(producer, OUTPUT_QUANT)
            if chain.output_before:  # the activation inside a norm+activation module reads the chain's output
                before = model.get_submodule(chain.output_before)
                before.register_forward_pre_hook(functools.partial(_quantize_input, getattr(producer, OUTPUT_QUANT)))
                continue
            tail = model.get_submodule(chain.output_module)
            tail.register_forward_hook(functools.partial(_quantize_output, getattr(producer, OUTPUT_QUANT)))
        for name, module in model.named_modules():
            if isinstance(module, REQUANTIZING_MODULES) and name not in tails:
                module.add_module(OUTPUT_QUANT, ActivationFakeQuant(self.averaging_constant))
                module.register_forward_hook(functools.partial(_quantize_output, getattr(module, OUTPUT_QUANT)))
        model.add_module(INPUT_QUANT, ActivationFakeQuant(self.averaging_constant))
        model.register_forward_pre_hook(functools.partial(_quantize_input, getattr(model, INPUT_QUANT)))
        model.register_load_state_dict_pre_hook(functools.partial(op_sites_from_state_dict, self.averaging_constant))
        self.model, self.chains = model, chains
        if example_inputs is not None:
            self.find_op_sites(example_inputs)
        self.step(0)
        return chains

    def _attach_normalization(self, model: nn.Module, chain: FusedChain) -> None:
        """A BatchNorm2d that follows no conv: its shift on the int32 grid of the depthwise 1x1 conv it
        becomes, and its output range (after its activation when TFLite fuses it)."""
        batchnorm = model.get_submodule(chain.producer)
        shift = BatchNormShiftFakeQuant(batchnorm)
        batchnorm.add_module(BIAS_QUANT, shift)
        batchnorm.add_module(OUTPUT_QUANT, ActivationFakeQuant(self.averaging_constant))
        inside = next((p for p in (chain.output_before, chain.activation) if p and p.startswith(f"{chain.producer}.")), None)
        if inside is None:
            batchnorm.register_forward_hook(functools.partial(_shift_on_int32_grid, shift))
        else:  # a norm+activation module: the norm's output is the input of its activation
            batchnorm.register_forward_pre_hook(functools.partial(_remember_input, shift))
            model.get_submodule(inside).register_forward_pre_hook(functools.partial(_shift_before_activation, shift))
        if chain.output_before:
            before = model.get_submodule(chain.output_before)
            before.register_forward_pre_hook(functools.partial(_quantize_input, getattr(batchnorm, OUTPUT_QUANT)))
        else:
            tail = model.get_submodule(chain.output_module)
            tail.register_forward_hook(functools.partial(_quantize_output, getattr(batchnorm, OUTPUT_QUANT)))

    def find_op_sites(self, example_inputs: tuple) -> list[str]:
        """Give every functional-op call site a fake-quant, found with one eval-mode forward of
        ``example_inputs`` (once; sites already made from a checkpoint keep their ranges)."""
        if not self.op_sites_found:
            with hook_ids_apart(self.model):
                self.op_sites = attach_op_sites(self.model, tuple(example_inputs), self.averaging_constant, self.grid)
            self.op_sites_found = True
        return self.op_sites

    def _modules(self, kind: type[nn.Module] | tuple[type[nn.Module], ...]) -> list[nn.Module]:
        return [m for m in self.model.modules() if isinstance(m, kind)]

    def step(self, step: int) -> None:
        """Phases: float before ``begin_step``; observe + fake-quant; after ``freeze_step`` the ranges freeze.

        BatchNorm is not frozen: it keeps normalizing with batch statistics while the weights are
        fake-quantized on the running-statistics fold that export uses (``WeightFakeQuant``), the
        correction of Jacob et al. 2018, until export folds BN for good. Putting BN in eval mode
        while training goes on lets the weights drift against stale statistics: with a constant
        learning rate the loss explodes within steps and the run ends at chance.
        """
        active = step >= self.begin_step
        frozen = self.freeze_step is not None and step >= self.freeze_step
        for quant in self._modules((WeightFakeQuant, BiasFakeQuant)):
            quant.enabled = active
        for quant in self._modules(ActivationFakeQuant):
            quant.enabled = active
            quant.observing = active and not frozen
        self.grid.enabled = active


    def strip(self) -> None:
        """Back to the float model, e.g. while channel pruning rebuilds it; ``prepare`` attaches it again."""
        strip_fake_quant(self.model)
        self.model, self.chains, self.op_sites, self.op_sites_found = None, [], [], False


_HOOKS = (_quantize_output, _quantize_input, _mark_norm_slice, _shift_on_int32_grid, _remember_input, _shift_before_activation, *HOOK_FUNCTIONS)


def strip_fake_quant(model: nn.Module) -> None:
    """Remove every sparselite fake-quant submodule and hook from a model (also on a deep copy)."""
    for module in model.modules():
        if type(module) in _FLOAT_CLASSES:
            module.__class__ = _FLOAT_CLASSES[type(module)]
        for name in (WEIGHT_QUANT, BIAS_QUANT, OUTPUT_QUANT, INPUT_QUANT, OP_QUANT):
            if name in module._modules:
                del module._modules[name]
        for key, wrapped in list(module._load_state_dict_pre_hooks.items()):
            if getattr(getattr(wrapped, "hook", None), "func", None) in LOAD_HOOK_FUNCTIONS:
                del module._load_state_dict_pre_hooks[key]
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                if isinstance(hook, functools.partial) and hook.func in _HOOKS:
                    del hooks[key]
                    module._forward_hooks_always_called.pop(key, None)


def learned_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """The ranges a prepared model holds, read from its modules (works on a deep copy too)."""
    ranges = {}
    for name, module in model.named_modules():
        # Output ranges are keyed by their producer's (or activation's) name, the input range by
        # the root's name, '', and functional ops by their fake-quant's path (functional_ops.site_name).
        for attr in (OUTPUT_QUANT, INPUT_QUANT):
            quant = module._modules.get(attr)
            if isinstance(quant, ActivationFakeQuant) and quant.initialized:
                ranges[name] = tuple(quant.min_max.tolist())
        if isinstance(module, ActivationFakeQuant) and module.initialized and f".{OP_QUANT}." in f".{name}":
            ranges[name] = tuple(module.min_max.tolist())
    return ranges
