"""``GradualPruning``: the Lightning adapter over ``MagnitudePruner``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from sparselite.deploy_form import warn_if_kept
from sparselite.pruning.pruner import MagnitudePruner, PrunedLayer, Scope
from sparselite.pruning.schedule import PolynomialDecay
from sparselite.pruning.selection import LayerSelection, Policy


class GradualPruning(pl.Callback):
    """Gradual magnitude pruning (Zhu & Gupta) during ``trainer.fit``.

    Args:
        final_sparsity: fraction of weights removed at ``end_step``, in [0, 1).
        begin_step / end_step: optimizer steps between which sparsity ramps up.
        frequency: steps between mask updates.
        initial_sparsity: sparsity applied at ``begin_step``.
        power: exponent of the polynomial decay (3 in the paper).
        pattern: 'unstructured', a block 'RxC' (e.g. '1x16' for TFLite's sparse FULLY_CONNECTED) or 'N:M'.
        scope: 'layer' (each layer reaches the target) or 'global' (one magnitude threshold for all).
        include / exclude: regular expressions over module names (whole-name match); a GRU/LSTM's gate
            matrices are layers of their own, ``rnn.weight_hh_l0`` (``sparselite.pruning.targets``).
        skip_depthwise / min_params: default skips, see ``sparselite.pruning.selection``.
        policy: 'all', or 'xnnpack_latency' to prune only the 1x1 convs XNNPACK's sparse kernels run.
        overrides: {name regex: {final_sparsity: x, pattern: p}} for individual layers.
    """

    def __init__(
        self,
        final_sparsity: float = 0.8,
        begin_step: int = 0,
        end_step: int = 1000,
        frequency: int = 100,
        initial_sparsity: float = 0.0,
        power: float = 3.0,
        pattern: str = "unstructured",
        scope: Scope = "layer",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        skip_depthwise: bool = True,
        min_params: int = 1024,
        policy: Policy = "all",
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        # Everything is validated here, before any training: the schedule, the pattern, the selection.
        schedule = PolynomialDecay(initial_sparsity=initial_sparsity, final_sparsity=final_sparsity,
                                   begin_step=begin_step, end_step=end_step, frequency=frequency, power=power)
        selection = LayerSelection(include=include, exclude=exclude, skip_depthwise=skip_depthwise,
                                   min_params=min_params, policy=policy)
        self.pruner = MagnitudePruner(schedule, pattern=pattern, scope=scope, selection=selection, overrides=overrides)

    def prepare(self, pl_module: pl.LightningModule) -> dict[str, PrunedLayer]:
        """Give the module its mask buffers (once), so a checkpoint's masks load into them."""
        if not self.pruner.layers:
            self.pruner.prepare(pl_module)
        return self.pruner.layers

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before checkpoint restore, so the mask buffers exist when the state_dict is loaded.
        if not self.pruner.layers:
            layers = self.prepare(pl_module)
            final = self.pruner.schedule.final_sparsity
            rank_zero_info(f"[sparselite] pruning {len(layers)} layers to {final:.0%}: {', '.join(layers)}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is None:  # a resumed run was told when it started
            warn_if_kept(pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.pruner.step(trainer.global_step):
            sparsity = self.pruner.sparsity()
            pl_module.log_dict({f"sparsity/{k}": v for k, v in sparsity.items()}, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.pruner.apply_masks()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sparsity = self.pruner.sparsity()
        rank_zero_info(f"[sparselite] final sparsity {sparsity['overall']:.1%} over {len(sparsity) - 1} layers")

    def state_dict(self) -> dict[str, Any]:
        return self.pruner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruner.load_state_dict(state_dict)
