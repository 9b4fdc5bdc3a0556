"""The distilling recipes parse, and `sparselite fit` distils from the checkpoint a dense `sparselite fit` wrote
(the teacher rebuilt from that run's config.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sparselite import Distillation
from sparselite.lightning_cli import build_lightning_cli

REPO = Path(__file__).resolve().parents[2]
RECIPES = ["gmp80_qat_distill_export.yaml", "channels50_qat_distill_export.yaml"]

TINY_CONFIG = """
seed_everything: 0
model:
  class_path: sparselite.models.classifier.ImageClassifier
  init_args:
    model:
      class_path: sparselite.models.mobilenet.MobileNetLite
      init_args: {stem_channels: 8, blocks: [[16, 1], [32, 2]]}
    lr: 0.005
data:
  class_path: sparselite.data.fashion_mnist.FashionMNISTDataModule
  init_args: {batch_size: 32, val_size: 1000}
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 3
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
"""


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_parses_with_a_checkpoint_teacher(recipe):
    cli = build_lightning_cli(["-c", str(REPO / "configs" / "fmnist_mobilenet.yaml"), "-c", str(REPO / "recipes" / recipe)],
                              run=False)
    (distillation,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, Distillation)]
    assert distillation.teacher_argument.endswith(".ckpt") and distillation.source == distillation.teacher_argument
    assert (distillation.temperature, distillation.weight, distillation.end_step) == (2.0, 0.5, None)


@pytest.mark.slow
def test_fit_distils_from_a_dense_sparselite_fit_checkpoint(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(TINY_CONFIG)
    dense = build_lightning_cli(["fit", "-c", str(config), "--trainer.default_root_dir", str(tmp_path / "dense")])
    (checkpoint,) = (tmp_path / "dense").rglob("*.ckpt")
    assert (checkpoint.parent.parent / "config.yaml").is_file()
    recipe = yaml.safe_load((REPO / "recipes" / RECIPES[0]).read_text())
    callbacks = [cb for cb in recipe["trainer"]["callbacks"] if cb["class_path"].endswith("Distillation")]
    callbacks[0]["init_args"]["teacher"] = str(checkpoint)
    recipe["trainer"]["callbacks"] = callbacks
    recipe["trainer"]["default_root_dir"] = str(tmp_path / "distill")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cli = build_lightning_cli(["fit", "-c", str(config), "-c", str(tmp_path / "recipe.yaml")])
    (distillation,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, Distillation)]
    assert cli.trainer.global_step == 3 and distillation.distiller.checked
    dense_state = dense.model.state_dict()
    teacher_state = distillation.teacher.state_dict()
    assert all(teacher_state[k].equal(v) for k, v in dense_state.items())
