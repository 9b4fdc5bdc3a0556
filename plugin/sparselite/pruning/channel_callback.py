"""``ChannelPruning``: the Lightning adapter over ``ChannelPruner``."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from sparselite.deploy_form import warn_if_kept
from sparselite.errors import SparseliteError
from sparselite.pruning.channels import ChannelPruner
from sparselite.pruning.schedule import PolynomialDecay


class ChannelPruning(pl.Callback):
    """Gradual channel pruning: masks whole output channels on the polynomial schedule, then removes them.

    A sibling of ``GradualPruning`` rather than one of its patterns: it removes channels from the model
    (a smaller dense network, faster on every runtime), where ``GradualPruning`` zeroes weights in place.
    Both can run in one recipe: channel pruning first, then unstructured pruning of what remains.

    Order in a recipe: channels are removed at ``end_step``, so ``QuantizationAwareTraining(begin_step)``
    must come after it (fake-quant is then attached to the smaller model).

    Args:
        final_sparsity: fraction of output channels removed in every prunable group, in [0, 1).
        begin_step / end_step / frequency / initial_sparsity / power: the schedule, as in ``GradualPruning``.
        importance: 'l2' or 'l1' norm of a channel's weights over its whole group, or 'bn_scale' (|gamma|).
        round_to: kept channels are a multiple of this (8 fills XNNPACK's int8 tiles).
        min_channels: no group keeps fewer channels than this.
        exclude: regular expressions over module names; a group touching a matching layer's output stays whole.
        shrink: remove the masked channels at ``end_step`` (else they stay as zeros; ``sparselite shrink`` later).
    """

    def __init__(
        self,
        final_sparsity: float = 0.5,
        begin_step: int = 0,
        end_step: int = 1000,
        frequency: int = 100,
        initial_sparsity: float = 0.0,
        power: float = 3.0,
        importance: str = "l2",
        round_to: int = 8,
        min_channels: int = 8,
        exclude: Sequence[str] | None = None,
        shrink: bool = True,
    ) -> None:
        # Validates every argument now, before any training.
        schedule = PolynomialDecay(initial_sparsity=initial_sparsity, final_sparsity=final_sparsity,
                                   begin_step=begin_step, end_step=end_step, frequency=frequency, power=power)
        self.pruner = ChannelPruner(schedule, importance=importance, round_to=round_to, min_channels=min_channels,
                                    exclude=exclude)
        self.shrink = shrink

    # ------------------------------------------------------------------ set-up
    def prepare(self, pl_module: pl.LightningModule) -> None:
        """Find the channel groups and give the module its masks (once). Before checkpoint restore: a shrunk
        checkpoint's plan is re-applied by the state_dict hook the pruner registers here."""
        if self.pruner.model is None:
            self.pruner.prepare(pl_module, example_inputs(pl_module))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._check_recipe(trainer)
        if self.pruner.model is not None:
            return
        with without_fake_quant(trainer.callbacks, pl_module):
            self.prepare(pl_module)
        names = [g.name for g in self.pruner.groups.values()]
        rank_zero_info(f"[sparselite] channel pruning {len(names)} groups to {self.pruner.schedule.final_sparsity:.0%} "
                       f"(multiples of {self.pruner.round_to}): {', '.join(names)}")

    def _check_recipe(self, trainer: pl.Trainer) -> None:
        from sparselite.quantization.callback import QuantizationAwareTraining

        end = self.pruner.schedule.end_step
        for callback in trainer.callbacks:
            if isinstance(callback, QuantizationAwareTraining) and self.shrink and callback.simulator.begin_step <= end:
                raise SparseliteError(
                    f"QuantizationAwareTraining(begin_step={callback.simulator.begin_step}) starts before ChannelPruning "
                    f"removes channels at end_step={end}; set begin_step > {end} so fake-quant learns the smaller model's ranges"
                )
        if self.shrink and trainer.world_size > 1:
            raise SparseliteError("ChannelPruning(shrink=True) rebuilds the model during fit, which needs a single device; "
                                  "use devices=1, or shrink=False and `sparselite shrink` after training")
        if trainer.max_steps is not None and 0 < trainer.max_steps <= end:
            warnings.warn(f"[sparselite] trainer.max_steps={trainer.max_steps} ends before ChannelPruning's end_step={end}: "
                          "channels stay masked (zeros) and are not removed", stacklevel=2)

    # ------------------------------------------------------------------ training
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is None:  # a resumed run was told when it started
            warn_if_kept(pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.pruner.step(step):
            ratio = self.pruner.channel_ratio()
            pl_module.log("channels/removed", ratio["overall"], on_step=True, on_epoch=False)
        if self.shrink and not self.pruner.shrunk and step >= self.pruner.schedule.end_step:
            self._shrink(trainer, pl_module)

    def _shrink(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with without_fake_quant(trainer.callbacks, pl_module):
            self.pruner.shrink(trainer.optimizers)
        after = self.pruner.size()
        before = self.pruner.before
        rank_zero_info(f"[sparselite] removed {self.pruner.channel_ratio()['overall']:.0%} of prunable channels at step "
                       f"{trainer.global_step}: params {before['params']:,} -> {after['params']:,}, "
                       f"MACs {before['macs']:,} -> {after['macs']:,} ({after['macs'] / before['macs']:.2f}x)")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.pruner.apply_masks()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.shrink and not self.pruner.shrunk:
            warnings.warn(f"[sparselite] training ended at step {trainer.global_step}, before ChannelPruning's end_step="
                          f"{self.pruner.schedule.end_step}: channels are masked but not removed", stacklevel=2)

    def state_dict(self) -> dict[str, Any]:
        return self.pruner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruner.load_state_dict(state_dict)


def example_inputs(pl_module: torch.nn.Module) -> torch.Tensor:
    example = getattr(pl_module, "example_input_array", None)
    if not isinstance(example, torch.Tensor):
        raise SparseliteError("ChannelPruning traces the model once and needs `example_input_array` (one input batch) "
                              "on the LightningModule; ImageClassifier sets it from input_shape")
    return example


@contextlib.contextmanager
def without_fake_quant(callbacks: list, pl_module: torch.nn.Module) -> Iterator[None]:
    """Take QAT's fake-quant off while channels are traced or removed, and put it back after: torch-pruning
    does not understand modules already wrapped for QAT. Before QAT's begin_step the wrappers hold no state."""
    from sparselite.quantization.callback import QuantizationAwareTraining

    qat = [cb for cb in callbacks if isinstance(cb, QuantizationAwareTraining) and cb.simulator.model is not None]
    for callback in qat:
        callback.simulator.strip()
    try:
        yield
    finally:
        for callback in qat:
            callback.prepare(pl_module)
