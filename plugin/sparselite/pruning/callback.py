"""``GradualPruning``: the Lightning adapter over ``MagnitudePruner``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from sparselite.pruning.pruner import MagnitudePruner
from sparselite.pruning.schedule import PolynomialDecay


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
        include / exclude: regular expressions over module names (whole-name match).
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
        scope: str = "layer",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        skip_depthwise: bool = True,
        min_params: int = 1024,
        policy: str = "all",
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.config = dict(
            final_sparsity=final_sparsity, begin_step=begin_step, end_step=end_step, frequency=frequency,
            initial_sparsity=initial_sparsity, power=power, pattern=pattern, scope=scope,
            include=list(include) if include else None, exclude=list(exclude) if exclude else None,
            skip_depthwise=skip_depthwise, min_params=min_params, policy=policy,
            overrides={k: dict(v) for k, v in (overrides or {}).items()},
        )
        self.pruner = build_pruner(self.config)  # validates every argument now, before any training

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before checkpoint restore, so the mask buffers exist when the state_dict is loaded.
        if not self.pruner.layers:
            layers = self.pruner.prepare(pl_module)
            rank_zero_info(f"[sparselite] pruning {len(layers)} layers to {self.config['final_sparsity']:.0%}: {', '.join(layers)}")

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
        return {"config": self.config, **self.pruner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruner.load_state_dict(state_dict)


def build_pruner(config: Mapping[str, Any]) -> MagnitudePruner:
    schedule = PolynomialDecay(
        initial_sparsity=config["initial_sparsity"], final_sparsity=config["final_sparsity"],
        begin_step=config["begin_step"], end_step=config["end_step"],
        frequency=config["frequency"], power=config["power"],
    )
    return MagnitudePruner(
        schedule, pattern=config["pattern"], scope=config["scope"], include=config["include"],
        exclude=config["exclude"], skip_depthwise=config["skip_depthwise"], min_params=config["min_params"],
        policy=config["policy"], overrides=config["overrides"],
    )
