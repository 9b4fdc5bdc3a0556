"""`sparselite sensitivity` end to end on a tiny model: progress lines, SIGTERM mid-sweep (one line, exit 143,
measured points kept), the rerun that goes on from there, and a written recipe that `sparselite fit` trains."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from test_cli import ROOT, own_stderr_lines, run_cli

TINY_CONFIG = """
seed_everything: 0
model:
  class_path: sparselite.models.classifier.ImageClassifier
  init_args:
    model:
      class_path: sparselite.models.mobilenet.MobileNetLite
      init_args:
        stem_channels: 8
        blocks: [[16, 1], [32, 2]]
    lr: 0.02
data:
  class_path: sparselite.data.fashion_mnist.FashionMNISTDataModule
  init_args:
    batch_size: 64
    train_subset: 1280
    val_size: 256
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 12
  limit_val_batches: 1
  val_check_interval: 12
"""

PRUNING = """
trainer:
  default_root_dir: {root}/runs/prune
  callbacks:
    - class_path: sparselite.GradualPruning
      init_args:
        final_sparsity: 0.7
        begin_step: 0
        end_step: 8
        frequency: 4
        min_params: 100
"""


@pytest.mark.slow
def test_sensitivity_interrupt_resume_and_the_recipe_trains(tmp_path):
    config, pruning = tmp_path / "tiny.yaml", tmp_path / "prune.yaml"
    config.write_text(TINY_CONFIG)
    pruning.write_text(PRUNING.format(root=tmp_path))
    out = tmp_path / "out"
    args = ["sensitivity", "-c", str(config), "-c", str(pruning), "--pretrain-steps", "30", "--grid", "0.5,0.9",
            "--val-batches", "2", "-o", str(out)]

    # SIGTERM once the sweep has measured a point: one line, exit 143, the points so far kept.
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "GLOG_minloglevel")}
    process = subprocess.Popen([sys.executable, "-m", "sparselite.cli", *args], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**env, "OMP_NUM_THREADS": "1"})
    lines = []
    deadline = time.monotonic() + 120
    for line in process.stdout:
        lines.append(line)
        if re.match(r"\[sensitivity\] 2/\d+ ", line) or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGTERM)
    stdout_rest, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr
    own = own_stderr_lines(subprocess.CompletedProcess([], 143, "", stderr))
    assert len(own) == 1 and own[0].startswith("sparselite: interrupted by SIGTERM"), own
    assert any("dense training 30/30" in line for line in lines)  # progress, as plain lines (not a terminal)
    assert (out / "sensitivity.json").is_file() and (out / "dense.pt").is_file()

    # The same command goes on: the dense model and the measured points are reused.
    result = run_cli(*args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dense weights from" in result.stdout and "(measured before)" in result.stdout
    assert "[sensitivity] 7/7 " in result.stdout
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    (callback,) = recipe["trainer"]["callbacks"]
    overrides = callback["init_args"]["overrides"]
    assert set(overrides) == {r"model\.features\.2\.0", r"model\.features\.4\.0", r"model\.classifier"}
    targets = {re.sub(r"\\", "", k): v["final_sparsity"] for k, v in overrides.items()}
    params = {"model.features.2.0": 128, "model.features.4.0": 512, "model.classifier": 320}
    overall = sum(targets[k] * params[k] for k in params) / sum(params.values())
    assert overall == pytest.approx(0.7, abs=2e-3)
    for name in ("sensitivity.csv", "sensitivity.png"):
        assert (out / name).stat().st_size > 100

    # The recipe trains, and each layer ends at its own target.
    fit = run_cli("fit", "-c", str(config), "-c", str(out / "recipe.yaml"), timeout=300)
    assert fit.returncode == 0, fit.stderr[-3000:]
    (ckpt,) = (tmp_path / "runs" / "prune_sensitivity").glob("lightning_logs/version_*/checkpoints/*.ckpt")
    state = torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]
    for layer, target in targets.items():
        mask = state[f"{layer}.sparselite_mask"]
        assert 1 - mask.float().mean().item() == pytest.approx(target, abs=0.02), layer


@pytest.mark.slow  # two subprocesses: ~10 s of imports each under load
def test_bad_input_is_one_line_and_exit_2(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from test_cli import assert_one_line_error

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    cases = {("sensitivity", "-c", str(config), "-o", str(tmp_path / "out")): "no GradualPruning callback",
             ("sensitivity", "-c", str(config), "--grid", "0.5,1.5", "-o", str(tmp_path / "out")): "every sparsity must be in (0, 1)"}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for fragment, result in zip(cases.values(), pool.map(lambda args: run_cli(*args), cases)):
            assert_one_line_error(result, fragment)
