"""`sparselite demo --channels`: its rows in the demo table (the run itself is too long for the suite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparselite import demo


def test_channel_rows_compare_with_the_dense_and_sparse_int8_files():
    summary = {
        "channels": {"accuracy": 0.9012, "bytes": 400_000},
        "bytes": {"int8_dense_tflite": 1_000_000},
        "latency_ms": {"int8": {"median_ms": 2.0}, "int8_channels": {"median_ms": 0.7}},
    }
    text = "\n".join(demo._channel_rows(summary))
    assert "90.12%" in text and "400,000" in text and "0.40x" in text and "0.35x" in text
    assert demo.CHANNEL_RECIPE.is_file()


@pytest.mark.slow
def test_fit_channels_trains_exports_and_reports_before_and_after(tmp_path, monkeypatch):
    """The --channels run on a small budget, distilled from a baseline file like the demo's cache: the teacher
    keeps every channel while the student shrinks; the recipe's TFLiteExport fills the channel report."""
    import torch
    import yaml
    from torch.utils.data import DataLoader, TensorDataset

    from sparselite import demo
    from sparselite.data.fashion_mnist import load_split
    from test_channel_recipes import scaled_recipe

    config = yaml.safe_load(demo.CONFIG.read_text())
    config["trainer"].update(max_steps=48, val_check_interval=20, limit_val_batches=2)
    config["data"]["init_args"].update(train_subset=1280, batch_size=64)
    small_config = tmp_path / "small_config.yaml"  # not config.yaml: the teacher file below would find it
    small_config.write_text(yaml.safe_dump(config))
    recipe, _ = scaled_recipe(demo.CHANNEL_RECIPE.stem, tmp_path)
    monkeypatch.setattr(demo, "CONFIG", small_config)
    monkeypatch.setattr(demo, "CHANNEL_RECIPE", recipe)
    baseline = demo.build_lightning_cli(["-c", str(small_config), "-c", str(demo.DENSE_RECIPE)], run=False).model
    teacher = tmp_path / "out" / "dense" / "baseline_state.pt"
    teacher.parent.mkdir(parents=True)
    torch.save({"fingerprint": "test", "state_dict": baseline.state_dict()}, teacher)

    images, labels = load_split("test")
    result = demo._fit_channels(tmp_path / "out", DataLoader(TensorDataset(images[:500], labels[:500]), batch_size=250),
                                teacher)
    assert result["distilled"]
    assert Path(result["path"]).is_file() and result["bytes"] < 0.4 * 1_153_000
    report = result["channel_report"]
    assert report["mac_ratio"] < 0.3 and report["params_after"] < 0.3 * report["params_before"]
    assert report["latency_ms_after"] < report["latency_ms_before"]
