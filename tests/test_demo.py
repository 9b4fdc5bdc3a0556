"""The demo's baseline cache: reused only when it was trained from the same config, recipe and model code."""

from __future__ import annotations

import torch

from sparselite import demo


def _fresh_baseline() -> torch.nn.Module:
    return demo.build_lightning_cli(["-c", str(demo.CONFIG), "-c", str(demo.DENSE_RECIPE)], run=False).model


def test_cached_baseline_with_matching_fingerprint_is_loaded_not_retrained(tmp_path, capsys):
    trained = _fresh_baseline()
    with torch.no_grad():
        trained.model.classifier.bias.fill_(0.25)  # a value a fresh model would not have
    path = tmp_path / "baseline_state.pt"
    torch.save({"fingerprint": demo._baseline_fingerprint(), "state_dict": trained.state_dict()}, path)

    loaded = demo._cached_baseline(path, retrain=False)

    assert "(cached)" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))

