"""SIGTERM / SIGINT during `sparselite fit`: exit 143 / 130 (never 0), a checkpoint that `--ckpt_path`
resumes, and no export of the half-trained model. Real CLI runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest

import sparselite
from sparselite.checkpoints import load_checkpoint
from sparselite.interrupts import GracefulInterrupt, Interrupted

from conftest import make_trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "fmnist_mobilenet.yaml")
RECIPE = str(ROOT / "recipes" / "gmp80.yaml")


def _fit(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sparselite.cli", "fit", "-c", CONFIG, "-c", RECIPE,
            "--trainer.default_root_dir", str(root), "--trainer.limit_val_batches", "0",
            "--data.init_args.train_subset", "640", "--data.init_args.batch_size", "32", *extra]


def _env() -> dict:
    # The runs start in tmp_path: the child must import this sparselite, whatever PYTHONPATH says.
    plugin = str(Path(sparselite.__file__).resolve().parents[1])
    return {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "GLOG_minloglevel")} | {
        "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([plugin, os.environ.get("PYTHONPATH", "")])}


class _SignalAfterStep(pl.Callback):
    """Sends ``signum`` to this process right after sparselite's own end-of-step check, at ``step``: the
    moment at which Lightning's SIGTERM flag, checked next, used to win and exit 0 with no checkpoint."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            signal.raise_signal(self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_between_sparselites_check_and_lightnings_stops_at_the_next_step(tmp_path, monkeypatch, tiny_model,
                                                                                   train_loader, signum):
    from sparselite.models.classifier import ImageClassifier

    monkeypatch.chdir(tmp_path)  # no checkpoint callback: the checkpoint goes to the default root, the cwd
    trainer = make_trainer(tmp_path, max_steps=50, callbacks=[GracefulInterrupt(), _SignalAfterStep(signum, 3)])
    with pytest.raises(Interrupted) as stopped:
        trainer.fit(ImageClassifier(tiny_model), train_loader)
    assert stopped.value.exit_code == 128 + signum and stopped.value.step == 4
    assert load_checkpoint(stopped.value.checkpoint)["global_step"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_fit_nonzero_with_a_checkpoint_that_resumes(tmp_path, signum):
    root = tmp_path / "run"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        fit = subprocess.Popen(_fit(root, "--trainer.max_steps", "100000"), stdout=subprocess.DEVNULL, stderr=err,
                               env=_env(), cwd=tmp_path)
        deadline = time.monotonic() + 240
        # Training is under way once the progress log (stderr, not a terminal) reaches step 100.
        while "step 100/" not in log.read_text() and time.monotonic() < deadline and fit.poll() is None:
            time.sleep(0.5)
        fit.send_signal(signum)
        fit.wait(timeout=120)
    stderr = log.read_text()
    assert fit.returncode == 128 + signum, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"sparselite: interrupted by {signal.Signals(signum).name} at step "), last
    (checkpoint,) = root.glob("lightning_logs/version_0/checkpoints/interrupted.ckpt")
    step = load_checkpoint(checkpoint)["global_step"]
    assert step >= 20 and f"--ckpt_path {checkpoint}" in last
    if signum == signal.SIGINT:
        return  # the same resume path as SIGTERM

    resumed = subprocess.run(_fit(root, "--trainer.max_steps", str(step + 10), "--ckpt_path", str(checkpoint)),
                             capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = sorted(root.glob("lightning_logs/version_1/checkpoints/*.ckpt"))
    assert [load_checkpoint(p)["global_step"] for p in final] == [step + 10]
