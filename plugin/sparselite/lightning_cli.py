"""The LightningCLI that ``sparselite fit|validate|test`` runs, and rebuilding a finished run from its
configs and checkpoint (for ``sparselite export`` and the demo's cached baseline).
Over 350 lines: building a run from configs and rebuilding a finished one share the same checks and
parser, and stay in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import contextlib
import inspect
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sparselite.errors import SparseliteError

# A config or recipe is a page of YAML. The bounds stop a multi-MB file or an alias bomb (a few lines
# whose anchors expand to billions of nodes) before jsonargparse walks it for minutes.
MAX_CONFIG_BYTES = 256 << 10
MAX_CONFIG_NODES = 100_000


def config_paths(args: list[str]) -> list[str]:
    """The files given with ``-c``/``--config`` (either spelling, with or without ``=``)."""
    paths = []
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            paths.append(args[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def check_config_file(path: str | Path) -> None:
    """Refuse, with one line, a config that is too big, not UTF-8 YAML, or expands past the node bound."""
    import yaml

    path = Path(path)
    if not path.is_file():
        return  # jsonargparse names a missing file itself
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise SparseliteError(f"config {path} is {size >> 10} KiB; configs and recipes are limited to "
                              f"{MAX_CONFIG_BYTES >> 10} KiB")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SparseliteError(f"config {path} is not a UTF-8 text file; give a YAML config") from None
    try:
        root = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml when built
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SparseliteError(f"config {path} is not valid YAML: {problem}{where}") from None
    except RecursionError:
        raise SparseliteError(f"config {path} is nested too deeply to be a config") from None
    if root is not None and _expanded_nodes(root, MAX_CONFIG_NODES) > MAX_CONFIG_NODES:
        raise SparseliteError(f"config {path} expands to more than {MAX_CONFIG_NODES} YAML nodes "
                              "once its aliases are expanded; a config is a page of values")


def _expanded_nodes(root, limit: int) -> int:
    """Nodes the document has once every alias is expanded (composed aliases share one node object),
    counted without expanding them: memoized by node, stopped once past ``limit``."""
    import yaml

    sizes: dict[int, int] = {}
    visiting: set[int] = set()  # nodes on the current path: meeting one again is a recursive alias
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        if children_done:
            visiting.discard(id(node))
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), limit + 1)
            continue
        if id(node) in sizes:
            continue
        if id(node) in visiting:
            return limit + 1  # infinite once expanded
        visiting.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in visiting:
                return limit + 1
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def build_lightning_cli(args: list[str], run: bool = True):
    """LightningCLI whose config errors raise instead of printing a usage screen."""
    import warnings

    for path in config_paths(args):
        check_config_file(path)

    from sparselite.interrupts import GracefulInterrupt
    from sparselite.progress import default_callbacks

    with warnings.catch_warnings():
        # We always pass ``args`` (sys.argv[1:] or a rebuilt list); LightningCLI warns about that on every run.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
        return _sparselite_cli_class()(
            args=args, run=run, subclass_mode_model=True, subclass_mode_data=True,
            parser_kwargs={"exit_on_error": False}, save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [*default_callbacks(), GracefulInterrupt()]},
        )


def _sparselite_cli_class():
    """LightningCLI that checks the callback list before the Trainer is built (defined on first use, so
    importing this module does not import Lightning)."""
    from lightning.pytorch.cli import LightningCLI

    class SparseliteCLI(LightningCLI):
        def _instantiate_trainer(self, config, callbacks):
            _refuse_callback_mapping(config.get("callbacks"))
            _refuse_duplicate_callbacks([*(config.get("callbacks") or []), *callbacks])
            max_steps = config.get("max_steps", -1)  # Lightning compares it with ints: null is a TypeError
            if not isinstance(max_steps, int) or isinstance(max_steps, bool):
                raise SparseliteError(f"trainer.max_steps={max_steps!r} must be a whole number (-1: no limit)")
            if max_steps == -1 and config.get("max_epochs") is None and config.get("max_time") is None:
                # Lightning would quietly run 1000 epochs; the recipes' schedules are in steps.
                raise SparseliteError("the run has no length: set trainer.max_steps (the recipes' schedules count "
                                      "steps), or trainer.max_epochs")
            if config.get("default_root_dir"):
                _check_writable_folder(Path(config["default_root_dir"]), "trainer.default_root_dir")
            _let_distillation_rebuild_runs([*(config.get("callbacks") or []), *callbacks])
            return super()._instantiate_trainer(config, callbacks)

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument(
                "--initial_weights", type=Optional[str], default=None,
                help="a checkpoint (e.g. a dense run's last.ckpt) whose model weights the model starts from, read "
                     "as tensors only: prune and quantize a trained model. Not a resume: the step count, optimizer "
                     "and schedules start at 0 (--ckpt_path resumes)")

        def before_fit(self) -> None:
            path = self._get(self.config, "initial_weights")
            if path:
                load_initial_weights(self.model, Path(path))
            _check_model_takes_data(self.model, self.datamodule)

    return SparseliteCLI


def load_initial_weights(module: Any, path: Path) -> None:
    """``initial_weights``: the checkpoint's model weights (not its masks, ranges or plans) into the model, before
    any callback prepares it; a file that is missing, unreadable or of another architecture fails in one line."""
    from sparselite.checkpoints import load_checkpoint, load_model_weights

    if not path.is_file():
        raise SparseliteError(f"initial_weights={path} does not exist; train that model first or fix the path")
    try:
        load_model_weights(module, load_checkpoint(path)["state_dict"], f"initial_weights={path}")
    except SparseliteError as err:
        raise SparseliteError(f"{err}" if str(err).startswith("initial_weights") else f"initial_weights: {err}") from None


def _refuse_callback_mapping(callbacks: Any) -> None:
    """``trainer.callbacks`` is a list. One mapping there (a callback without its ``-``, or ``{}``) would
    replace, not extend, the other configs' callbacks."""
    if callbacks is not None and not isinstance(callbacks, list):
        raise SparseliteError("trainer.callbacks is one mapping, not a list; write each callback as a list entry "
                              "('- class_path: ...')")


# Torch's messages when an input does not fit a layer (conv channels, linear features, sizes).
_SHAPE_ERRORS = ("expected input", "channels", "shapes cannot be multiplied", "size mismatch", "must match the size",
                 "Calculated padded input size", "Kernel size can't be greater")


def _check_model_takes_data(module: Any, datamodule: Any) -> None:
    """One example of the training data through the model (eval mode, no grad), before training starts:
    a model configured for other inputs (in_channels: 3 on grayscale data) fails here with one line that
    names both shapes, not in the first training step with a traceback."""
    import torch

    inputs = _one_training_input(datamodule)
    if inputs is None or not isinstance(module, torch.nn.Module):
        return
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(inputs)
    except RuntimeError as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if not any(fragment in text for fragment in _SHAPE_ERRORS):
            raise
        raise SparseliteError(f"the model does not take the data's input: {_expected_input(module)}, but the "
                              f"datamodule's batches are {list(inputs.shape)[1:]} per example (torch: {text[:200]}); "
                              "make the model's input settings (e.g. in_channels) and the data's (e.g. channels, "
                              "image_size) agree") from None
    finally:
        module.train(was_training)


def _one_training_input(datamodule: Any):
    """The input tensor of one training example, batched as the training loader batches it; None where
    the data is not (inputs, ...) batches of a map-style dataset (the check is then skipped)."""
    import torch

    if datamodule is None:
        return None
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__") or not len(dataset):
        return None
    collate = getattr(loader, "collate_fn", None)
    try:
        batch = collate([dataset[0]]) if collate is not None else None
    except (TypeError, ValueError, KeyError, IndexError):  # a dataset or collate this check does not understand
        return None
    inputs = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    return inputs if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 else None


def _expected_input(module: Any) -> str:
    """What the model's first layer takes, e.g. "its first layer (model.features.0.0, Conv2d) takes 3 channels"."""
    import torch

    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.modules.conv._ConvNd):
            return f"its first layer ({name}, {type(layer).__name__}) takes {layer.in_channels} input channels"
        if isinstance(layer, torch.nn.Linear):
            return f"its first layer ({name}, Linear) takes {layer.in_features} input features"
    return "its first layer does not take it"


def _let_distillation_rebuild_runs(callbacks: list) -> None:
    """A teacher checkpoint written by ``sparselite fit`` is rebuilt from the config.yaml next to it."""
    from sparselite.distillation.callback import Distillation

    def rebuild(checkpoint: Path):
        return restore_run(checkpoint).module if find_run_config(checkpoint) is not None else None

    for callback in callbacks:
        if isinstance(callback, Distillation):
            callback.rebuild_run = rebuild


def _check_writable_folder(folder: Path, what: str) -> None:
    """Logs and checkpoints go there: a read-only or impossible folder fails now, not at the first save."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise SparseliteError(f"{what}={folder} is not a writable folder: {err.strerror or err}") from None


def _refuse_duplicate_callbacks(callbacks: list) -> None:
    """Two GradualPruning (or QAT, or export) callbacks would fight over the same weights; Lightning
    refuses them too, but with a RuntimeError about checkpoint state keys."""
    from sparselite.export.callback import TFLiteExport
    from sparselite.pruning.callback import GradualPruning
    from sparselite.quantization.callback import QuantizationAwareTraining

    for kind, hint in ((GradualPruning, " (per-layer settings go in its overrides)"),
                       (QuantizationAwareTraining, ""), (TFLiteExport, "")):
        if sum(isinstance(c, kind) for c in callbacks) > 1:
            raise SparseliteError(f"two {kind.__name__} callbacks are configured; keep one{hint}")


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
    from sparselite.pruning.channel_callback import ChannelPruning
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
    for callback in sorted(callbacks, key=lambda cb: not isinstance(cb, ChannelPruning)):
        if isinstance(callback, (ChannelPruning, GradualPruning, QuantizationAwareTraining)):
            callback.prepare(module)  # the mask, plan and range buffers the checkpoint holds
    try:
        module.load_state_dict(loaded["state_dict"])
    except (RuntimeError, KeyError) as err:
        raise SparseliteError(f"{path} does not match the configured model: {str(err).splitlines()[0]}") from None
    qat = next((cb for cb in callbacks if isinstance(cb, QuantizationAwareTraining)), None)
    if qat is not None and not qat.simulator.op_sites_found:
        # The run found its functional ops at its first batch: find them again, ranges already loaded.
        qat.simulator.find_op_sites((_first_input(cli.datamodule),))
    return RestoredRun(module, cli.datamodule, callbacks, loaded)


def _first_input(datamodule: Any):
    """One input example from the run's data (validation data, else training data)."""
    import torch

    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    if not loader:
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
    batch = next(iter(loader), None)
    inputs = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(inputs, torch.Tensor):
        raise SparseliteError("the run's data gives no input tensor to find the model's functional ops with; its "
                              "batches must be (inputs, ...), or set example_input_array on the LightningModule")
    return inputs[:1]


def build_datamodule(configs: list[str]) -> Any:
    """A config's datamodule, built as ``sparselite fit`` builds the run (model and trainer too), not trained."""
    for config in configs:
        if not Path(config).is_file():
            raise SparseliteError(f"config {config} does not exist")
    with tempfile.TemporaryDirectory() as folder, _lightning_info_off():
        configs = _without_subcommand_keys(configs, Path(folder))
        cli = build_lightning_cli([arg for c in configs for arg in ("-c", c)], run=False)
    if cli.datamodule is None:
        raise SparseliteError("the config has no data: section (a LightningDataModule) to evaluate on")
    return cli.datamodule
