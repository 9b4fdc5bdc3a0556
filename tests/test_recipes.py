"""Every shipped recipe and config still builds a run: the YAML shape the README documents is the one
the callbacks accept (LightningCLI parses it and instantiates every class, without training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sparselite.lightning_cli import build_lightning_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_recipe_builds_a_run(config, recipe, tmp_path):
    cli = build_lightning_cli(["-c", str(config), "-c", str(recipe), "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.model is not None and cli.datamodule is not None
    expected = [cb["class_path"].rsplit(".", 1)[-1] for cb in
                (yaml.safe_load(recipe.read_text())["trainer"].get("callbacks") or [])]
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert all(name in names for name in expected), (expected, names)
