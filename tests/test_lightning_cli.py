"""SparseliteCLI's checks before training: ``trainer.callbacks`` written as one mapping, and a model whose
input does not fit the data (in_channels: 3 on grayscale Fashion-MNIST), each one line and exit 2."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from sparselite.errors import SparseliteError
from sparselite.lightning_cli import build_lightning_cli
from test_cli import CONFIG, assert_one_line_error, run_cli

ONE_MAPPING = """\
trainer:
  callbacks:
    class_path: sparselite.GradualPruning
    init_args: {final_sparsity: 0.5, begin_step: 0, end_step: 2, frequency: 1}
"""
EMPTY_MAPPING = "trainer:\n  callbacks: {}\n"
RGB_MODEL = """\
model:
  init_args:
    model:
      class_path: sparselite.models.mobilenet.MobileNetLite
      init_args: {in_channels: 3, stem_channels: 8, blocks: [[16, 1]]}
"""
SMALL_RUN = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--data.init_args.train_subset", "64",
             "--data.init_args.batch_size", "16"]
FRAGMENTS = {
    "one_mapping": ["trainer.callbacks is one mapping, not a list"],
    "empty_mapping": ["trainer.callbacks is one mapping, not a list"],
    "rgb_model": ["the model does not take the data's input", "takes 3 input channels", "[1, 28, 28]", "in_channels"],
}


def _recipes(tmp_path):
    paths = {}
    for name, text in (("one_mapping", ONE_MAPPING), ("empty_mapping", EMPTY_MAPPING), ("rgb_model", RGB_MODEL)):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(text)
    return paths


@pytest.mark.parametrize("name", ["one_mapping", "empty_mapping", "rgb_model"])
def test_refused_before_training_in_process(tmp_path, name):
    recipe = _recipes(tmp_path)[name]
    with pytest.raises(SparseliteError) as err:
        build_lightning_cli(["fit", "-c", CONFIG, "-c", str(recipe), "--trainer.default_root_dir", str(tmp_path / "run"),
                             *SMALL_RUN])
    assert "\n" not in str(err.value)
    for fragment in FRAGMENTS[name]:
        assert fragment in str(err.value)


def test_refused_by_the_real_cli_with_one_line_and_exit_2(tmp_path):
    recipes = _recipes(tmp_path)
    names = ["one_mapping", "rgb_model"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda n: run_cli("fit", "-c", CONFIG, "-c", str(recipes[n]), "--trainer.default_root_dir",
                                                  str(tmp_path / n), *SMALL_RUN), names))
    for name, result in zip(names, results):
        assert_one_line_error(result, *FRAGMENTS[name])


def test_initial_weights_start_the_run_from_a_trained_model(tmp_path):
    """``sparselite fit --initial_weights``: the checkpoint's weights are in the model when training starts, with the
    recipe's pruning callback prepared over them; the step count starts at 0, not at the checkpoint's."""
    import torch

    from sparselite.models.classifier import ImageClassifier
    from sparselite.models.mobilenet import MobileNetLite

    torch.manual_seed(123)  # not the config's seed: other weights than the run would initialize
    trained = ImageClassifier(MobileNetLite())
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "trained.ckpt")
    recipe = tmp_path / "prune.yaml"
    recipe.write_text("trainer:\n  callbacks:\n    - class_path: sparselite.GradualPruning\n"
                      "      init_args: {final_sparsity: 0.5, begin_step: 0, end_step: 2, frequency: 1}\n")
    cli = build_lightning_cli(["fit", "-c", CONFIG, "-c", str(recipe), "--initial_weights", str(tmp_path / "trained.ckpt"),
                               "--trainer.default_root_dir", str(tmp_path / "run"), *SMALL_RUN, "--trainer.max_steps", "0"])
    assert cli.trainer.global_step == 0
    assert any(name.endswith("sparselite_mask") for name, _ in cli.model.named_buffers())
    started = dict(trained.named_parameters())
    for name, parameter in cli.model.named_parameters():
        torch.testing.assert_close(parameter.detach(), started[name].detach(), msg=name)


@pytest.mark.parametrize("case", ["missing", "other_architecture"])
def test_bad_initial_weights_are_refused_in_one_line(tmp_path, case):
    import torch

    path = tmp_path / "initial.ckpt"
    if case == "other_architecture":
        torch.save({"state_dict": torch.nn.Linear(3, 2).state_dict()}, path)
    with pytest.raises(SparseliteError) as err:
        build_lightning_cli(["fit", "-c", CONFIG, "--initial_weights", str(path), "--trainer.default_root_dir",
                             str(tmp_path / "run"), *SMALL_RUN])
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"initial_weights={path} ")
    assert ("does not exist" if case == "missing" else "does not fit the model's architecture") in str(err.value)
