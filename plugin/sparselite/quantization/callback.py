"""``QuantizationAwareTraining``: the Lightning adapter over ``QuantizationSimulator``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from sparselite.quantization.fusion import FusedChain
from sparselite.quantization.qat import QuantizationSimulator


class QuantizationAwareTraining(pl.Callback):
    """Fake-quant that simulates TFLite int8 (per-channel symmetric weights, per-tensor affine activations).

    Args:
        begin_step: optimizer step at which fake-quant and range observation begin (let pruning settle first).
        freeze_step: step after which activation ranges stop updating; None = never. BatchNorm keeps
            training on batch statistics (the weights are fake-quantized on the fold export uses).
        averaging_constant: weight of each batch in the moving-average activation ranges; by default
            3 / (freeze_step - begin_step), so that the ranges settle before they freeze (0.01 when they
            never freeze). See ``qat.default_averaging_constant``.
    """

    def __init__(self, begin_step: int = 0, freeze_step: int | None = None,
                 averaging_constant: float | None = None) -> None:
        # Validates now, before any training.
        self.simulator = QuantizationSimulator(begin_step=begin_step, freeze_step=freeze_step,
                                               averaging_constant=averaging_constant)

    def prepare(self, pl_module: pl.LightningModule) -> list[FusedChain]:
        """Attach fake-quant (once), so a checkpoint's learned ranges load into it. With the module's
        ``example_input_array``, functional ops (add, mul, cat) get theirs too (``op_points.py``)."""
        example = pl_module.example_input_array
        example = None if example is None else (example,) if isinstance(example, torch.Tensor) else tuple(example)
        return self.simulator.prepare(pl_module, example)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before checkpoint restore, so the range buffers exist when the state_dict is loaded.
        chains = self.prepare(pl_module)
        sites = f" and {len(self.simulator.op_sites)} functional ops (add, mul, cat)" if self.simulator.op_sites else ""
        if pl_module.example_input_array is None:
            sites = "; set example_input_array on the LightningModule to also learn add/mul/cat ranges"
        rank_zero_info(f"[sparselite] QAT on {len(chains)} layers{sites} from step {self.simulator.begin_step}")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.simulator.step(trainer.global_step)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.simulator.step(trainer.global_step)
