"""``QuantizationAwareTraining``: the Lightning adapter over ``QuantizationSimulator``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from sparselite.deploy_form import warn_if_kept
from sparselite.errors import SparseliteError
from sparselite.quantization.fusion import FusedChain
from sparselite.quantization.float_activations import FloatActivationSimulator
from sparselite.quantization.layer_precision import PrecisionSpec, check_precision, is_int8_file
from sparselite.quantization.qat import QuantizationSimulator


class QuantizationAwareTraining(pl.Callback):
    """Fake-quant that simulates what the exported file computes: by default TFLite int8 (per-channel
    symmetric weights, per-tensor affine activations).

    Args:
        precision: 'int8' (the fully int8 file), or a float-activation precision: 'dynamic_int8', 'fp16',
            'fp32' or a per-layer mapping (``layer_precision.py``), simulated by ``float_activations.py``
            (int8 weights and XNNPACK's run-time rounding of the input, or fp16 weights). The export
            follows it unless told another precision.
        begin_step: optimizer step at which fake-quant and range observation begin (let pruning settle first).
        freeze_step: step after which activation ranges stop updating; None = never. BatchNorm keeps
            training on batch statistics (the weights are fake-quantized on the fold export uses).
        averaging_constant: weight of each batch in the moving-average activation ranges; by default
            3 / (freeze_step - begin_step), so that the ranges settle before they freeze (0.01 when they
            never freeze). See ``qat.default_averaging_constant``.
    """

    def __init__(self, begin_step: int = 0, freeze_step: int | None = None,
                 averaging_constant: float | None = None, precision: PrecisionSpec = "int8") -> None:
        # Validates now, before any training.
        check_precision(precision)
        if precision != "int8" and is_int8_file(precision):
            raise SparseliteError(f"precision={precision!r}: a mapping whose default is 'int8' is for the export (an int8 "
                                  "file with some layers float-activation); train with precision='int8' and pass the "
                                  "mapping to the export")
        if precision == "int8":
            self.simulator = QuantizationSimulator(begin_step=begin_step, freeze_step=freeze_step,
                                                   averaging_constant=averaging_constant)
        else:
            if freeze_step is not None or averaging_constant is not None:
                raise SparseliteError(f"freeze_step and averaging_constant set activation ranges, which precision="
                                      f"{precision!r} does not have (its activations stay float); leave them unset")
            self.simulator = FloatActivationSimulator(precision, begin_step)

    def prepare(self, pl_module: pl.LightningModule, example_inputs: tuple | None = None) -> list[FusedChain]:
        """Attach fake-quant (once), so a checkpoint's learned ranges load into it. Functional ops (add,
        mul, cat) get theirs from one forward of ``example_inputs`` (default: the module's
        ``example_input_array``), or else of the first training batch (``functional_ops.py``)."""
        if example_inputs is None and pl_module.example_input_array is not None:
            example = pl_module.example_input_array
            example_inputs = (example,) if isinstance(example, torch.Tensor) else tuple(example)
        return self.simulator.prepare(pl_module, example_inputs)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before checkpoint restore, so the range buffers exist when the state_dict is loaded.
        chains = self.prepare(pl_module)
        if isinstance(self.simulator, FloatActivationSimulator):
            rank_zero_info(f"[sparselite] QAT for precision {self.simulator.precision!r} on {len(chains)} layers "
                           f"from step {self.simulator.begin_step}")
            return
        sites = (f" and {len(self.simulator.op_sites)} functional ops (add, mul, cat)" if self.simulator.op_sites_found
                 else "; functional ops (add, mul, cat) are found at the first batch")
        rank_zero_info(f"[sparselite] QAT on {len(chains)} layers{sites} from step {self.simulator.begin_step}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is None:  # a resumed run was told when it started
            warn_if_kept(pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.simulator.op_sites_found:
            self._find_op_sites(batch)
        self.simulator.step(trainer.global_step)

    def _find_op_sites(self, batch: Any) -> None:
        inputs = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(inputs, torch.Tensor):
            raise SparseliteError(
                f"QAT finds the model's functional ops (add, mul, cat) with one training batch, but the batch's first "
                f"item is a {type(inputs).__name__}, not the input tensor; give the batches as (inputs, ...) or set "
                "example_input_array on the LightningModule")
        sites = self.simulator.find_op_sites((inputs[:1],))
        rank_zero_info(f"[sparselite] QAT found {len(sites)} functional ops (add, mul, cat) in the first batch")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.simulator.step(trainer.global_step)
