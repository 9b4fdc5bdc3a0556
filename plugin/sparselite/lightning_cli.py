"""The LightningCLI that ``sparselite fit|validate|test`` runs, and rebuilding a finished run from its
configs and checkpoint (for ``sparselite export`` and the demo's cached baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import contextlib
import inspect
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sparselite.errors import SparseliteError


def build_lightning_cli(args: list[str], run: bool = True):
    """LightningCLI whose config errors raise instead of printing a usage screen."""
    import warnings

    from lightning.pytorch.cli import LightningCLI

    from sparselite.progress import default_callbacks

    # We always pass ``args`` (sys.argv[1:] or a rebuilt list); LightningCLI warns about that on every run.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    return LightningCLI(
        args=args, run=run, subclass_mode_model=True, subclass_mode_data=True,
        parser_kwargs={"exit_on_error": False}, save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": default_callbacks()},
    )


def find_run_config(checkpoint: Path) -> Path | None:
    """The config.yaml LightningCLI saved for the run a checkpoint belongs to (up to three folders up)."""
    for folder in (checkpoint.parent, checkpoint.parent.parent, checkpoint.parent.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def _without_subcommand_keys(configs: list[str], folder: Path) -> list[str]:
    """Copies of ``configs`` without the fit/validate/test arguments (ckpt_path, weights_only, verbose) that
    LightningCLI saves in a run's config.yaml: the subcommand-less parser that rebuilds the run rejects
    them ("Option 'ckpt_path' is not accepted")."""
    import yaml
    from lightning.pytorch import Trainer

    data_args = {"self", "model", "train_dataloaders", "val_dataloaders", "dataloaders", "datamodule"}
    subcommand_keys = {name for method in (Trainer.fit, Trainer.validate, Trainer.test)
                       for name in inspect.signature(method).parameters if name not in data_args}
    cleaned = []
    for index, config in enumerate(configs):
        data = yaml.safe_load(Path(config).read_text())
        if isinstance(data, dict) and subcommand_keys & set(data):
            for key in subcommand_keys:
                data.pop(key, None)
            config = str(folder / f"{index}_{Path(config).name}")
            Path(config).write_text(yaml.safe_dump(data))
        cleaned.append(config)
    return cleaned


@contextlib.contextmanager
def _lightning_info_off() -> Iterator[None]:
    """Rebuilding a run for export is not training: no "Seed set", "GPU available" lines."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@dataclass
class RestoredRun:
    """A finished run rebuilt from its configs, with the checkpoint's weights in place."""

    module: Any
    datamodule: Any
    callbacks: list
    checkpoint: dict  # the checkpoint as loaded (tensors only)

    def callback(self, kind: type) -> Any | None:
        return next((cb for cb in self.callbacks if isinstance(cb, kind)), None)


def restore_run(checkpoint: str | Path, configs: list[str] | None = None) -> RestoredRun:
    """A finished run rebuilt from its configs (default: the config.yaml next to the checkpoint),
    compression state attached, checkpoint weights loaded."""
    from sparselite.checkpoints import load_checkpoint
    from sparselite.pruning.callback import GradualPruning
    from sparselite.pruning.channel_callback import ChannelPruning, example_inputs
    from sparselite.quantization.callback import QuantizationAwareTraining

    path = Path(checkpoint)
    loaded = load_checkpoint(path)  # tensors only, never code; before anything is built
    configs = configs or ([str(c)] if (c := find_run_config(path)) else [])
    if not configs:
        raise SparseliteError(f"no config.yaml found next to {path}; pass the run's configs with -c")
    with tempfile.TemporaryDirectory() as folder, _lightning_info_off():
        configs = _without_subcommand_keys(configs, Path(folder))
        cli = build_lightning_cli([arg for c in configs for arg in ("-c", c)], run=False)
    module = cli.model
    callbacks = list(cli.trainer.callbacks)
    # Channel pruning first, before QAT wraps modules: a shrunk checkpoint's plan rebuilds the smaller
    # model when its state_dict loads.
    for callback in callbacks:
        if isinstance(callback, ChannelPruning):
            callback.pruner.prepare(module, example_inputs(module))
    for callback in callbacks:
        if isinstance(callback, (GradualPruning, QuantizationAwareTraining)):
            callback.prepare(module)  # the mask and range buffers the checkpoint holds
    try:
        module.load_state_dict(loaded["state_dict"])
    except (RuntimeError, KeyError) as err:
        raise SparseliteError(f"{path} does not match the configured model: {str(err).splitlines()[0]}") from None
    return RestoredRun(module, cli.datamodule, callbacks, loaded)
