"""The channel-pruning recipes and `sparselite shrink`, through the real command line."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from test_cli import CONFIG, ROOT, assert_one_line_error, run_cli

SMALL_RUN = ["--trainer.val_check_interval", "20", "--trainer.limit_val_batches", "2",
             "--data.init_args.train_subset", "1280", "--data.init_args.batch_size", "64"]
STEP_KEYS = ("begin_step", "end_step", "frequency", "freeze_step")


def scaled_recipe(name: str, tmp_path: Path, factor: int = 25) -> tuple[Path, Path]:
    """recipes/<name>.yaml with every step divided by ``factor`` and its export written under tmp_path."""
    recipe = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
    tflite = tmp_path / "model.tflite"
    for callback in recipe["trainer"]["callbacks"]:
        args = callback.setdefault("init_args", {})
        for key in STEP_KEYS:
            if key in args:
                args[key] = max(1, args[key] // factor)
        if callback["class_path"].endswith("TFLiteExport"):
            # 12 QAT steps leave small logit margins: a few near-ties may flip (max diff stays a few LSB).
            args.update(path=str(tflite), verify_batches=2, calibration_batches=1, min_agreement=0.95)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, tflite


@pytest.mark.slow
@pytest.mark.parametrize("name", ["channels50_qat_export", "channels50_gmp80_qat_export"])
def test_recipe_removes_channels_and_exports_a_verified_int8_file(tmp_path, name):
    recipe, tflite = scaled_recipe(name, tmp_path)
    fit = run_cli("fit", "-c", CONFIG, "-c", str(recipe), "--trainer.default_root_dir", str(tmp_path / "run"),
                  "--trainer.max_steps", "48", *SMALL_RUN, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "removed 50% of prunable channels" in fit.stdout + fit.stderr
    report = json.loads(tflite.with_suffix(".json").read_text())
    assert report["parity"]["top1_agreement"] >= 0.95 and report["parity"]["max_logit_diff_lsb"] <= 8
    if "gmp80" in name:
        assert report["overall_sparsity_in_file"] == pytest.approx(0.8, abs=0.02)


@pytest.mark.slow
def test_shrink_command_then_export(tmp_path):
    compression = tmp_path / "channels.yaml"
    compression.write_text(textwrap.dedent("""
        trainer:
          callbacks:
            - class_path: sparselite.ChannelPruning
              init_args:
                final_sparsity: 0.5
                end_step: 8
                frequency: 4
                shrink: false
    """))
    root = tmp_path / "run"
    fit = run_cli("fit", "-c", CONFIG, "-c", str(compression), "--trainer.default_root_dir", str(root),
                  "--trainer.max_steps", "20", *SMALL_RUN, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]
    (ckpt,) = root.glob("lightning_logs/version_*/checkpoints/*.ckpt")
    config = ckpt.parents[1] / "config.yaml"

    shrunk = tmp_path / "shrunk.ckpt"
    result = run_cli("shrink", str(ckpt), "-o", str(shrunk), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "removed 50% of prunable channels" in result.stdout
    state = torch.load(shrunk, map_location="cpu", weights_only=False)["state_dict"]
    assert state["model.features.16.0.weight"].shape[0] == 512  # 1024 -> 512

    out = tmp_path / "model.tflite"
    export = run_cli("export", str(shrunk), "-c", str(config), "-o", str(out), "--verify-batches", "2",
                     "--calibration-batches", "2", timeout=400)
    assert export.returncode == 0, export.stderr[-3000:]
    assert out.is_file()

    again = run_cli("shrink", str(tmp_path / "missing.ckpt"), "-o", str(shrunk))
    assert_one_line_error(again, "does not exist")
