"""`sparselite eval` on the user's data (--images DIR, -c config) and what stops it: real exported files,
real image folders, real CLI runs. Also: SIGTERM/SIGINT during `eval` and `bench` end in one line and
exit 143/130 (cli.main's handling, the same for every command)."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import tiny_mobilenet
from test_cli import CONFIG, assert_one_line_error, own_stderr_lines, run_cli
from test_evaluation import make_image_folder


@pytest.fixture(scope="module")
def models(tmp_path_factory, fmnist_train) -> dict[str, Path]:
    """A gray 28x28 and an RGB 32x32 tiny MobileNet (10 classes), exported with sparselite's own exporter."""
    from sparselite import export_tflite

    folder = tmp_path_factory.mktemp("eval_models")
    paths = {"gray": folder / "gray.tflite", "rgb": folder / "rgb.tflite"}
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        export_tflite(tiny_mobilenet().eval(), torch.zeros(1, 1, 28, 28), paths["gray"],
                      calibration_data=[fmnist_train[0][:32]])
        export_tflite(tiny_mobilenet(in_channels=3).eval(), torch.zeros(1, 3, 32, 32), paths["rgb"],
                      calibration_data=[torch.randn(16, 3, 32, 32)])
    return paths


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every eval command once, two at a time (each run is mostly imports)."""
    root = tmp_path_factory.mktemp("eval_data")
    images = make_image_folder(root / "images", classes=("bag", "boot", "coat"), per_class=4)
    empty = make_image_folder(root / "empty", classes=("a",))
    (empty / "b").mkdir()
    corrupt = make_image_folder(root / "corrupt", classes=("a", "b"))
    (corrupt / "b" / "cut.png").write_bytes((images / "bag" / "1.png").read_bytes()[:60])
    commands = {
        "images_json": ["eval", str(models["gray"]), "--images", str(images), "--mean", "0.286", "--std", "0.353", "--json"],
        "images_text": ["eval", str(models["rgb"]), "--images", str(images)],
        "config": ["eval", str(models["gray"]), "-c", CONFIG, "--limit", "64", "--json"],
        "empty_class_folder": ["eval", str(models["gray"]), "--images", str(empty)],
        "shape_mismatch": ["eval", str(models["rgb"]), "-c", CONFIG, "--limit", "64"],
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(commands, pool.map(lambda args: run_cli(*args), commands.values())))


@pytest.fixture
def main_in_process(capsys):
    """``cli.main`` in this process (no imports to wait for): (exit code, stderr). Restores SIGTERM's handler."""
    from sparselite.cli import main

    def run(*args: str) -> tuple[int, str]:
        previous = signal.getsignal(signal.SIGTERM)
        try:
            main(["-v", *args])  # -v: no stderr filter thread inside pytest's capture
            code = 0
        except SystemExit as stop:
            code = stop.code
        finally:
            signal.signal(signal.SIGTERM, previous)
        return code, capsys.readouterr().err

    return run


def test_images_scores_top1_top5_and_confusion_matrix(runs):
    done = runs["images_json"]
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["examples"] == 12 and result["classes"] == ["bag", "boot", "coat"]
    assert 0 <= result["top1"] <= result["top5"] <= 1 and result["accuracy"] == result["top1"]
    matrix = result["confusion_matrix"]
    assert len(matrix) == 10 and all(len(row) == 10 for row in matrix)
    assert [sum(row) for row in matrix[:3]] == [4, 4, 4] and sum(map(sum, matrix)) == 12


def test_images_text_form_resizes_for_an_rgb_model(runs):
    done = runs["images_text"]
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert "top-1" in lines[0] and "top-5" in lines[0] and "over 12 images" in lines[0]
    assert lines[1].startswith("confusion matrix") and lines[2].split()[:3] == ["bag", "boot", "coat"]
    assert len(lines) == 6  # header + the three classes' rows


def test_config_scores_its_datamodules_test_set(runs):
    done = runs["config"]
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["examples"] == 64 and "test" in result["source"] and len(result["confusion_matrix"]) == 10


@pytest.mark.parametrize("name, fragments", [
    ("empty_class_folder", ["is empty"]),
    ("shape_mismatch", ["takes 3-channel images", "1-channel data"]),
])
def test_bad_data_is_one_line_and_exit_2(runs, name, fragments):
    assert_one_line_error(runs[name], *fragments)


def test_more_bad_data_in_process(models, tmp_path, main_in_process):
    images = make_image_folder(tmp_path / "images", classes=("a", "b"), per_class=1)
    corrupt = make_image_folder(tmp_path / "corrupt", classes=("a",))
    (corrupt / "a" / "cut.png").write_bytes((images / "a" / "0.jpg").read_bytes()[:40])
    many = make_image_folder(tmp_path / "many", classes=[f"c{i:02d}" for i in range(11)], per_class=1, size=(4, 4))
    cases = {
        "missing_folder": (["--images", str(tmp_path / "nowhere")], ["does not exist"]),
        "corrupt_image": (["--images", str(corrupt)], ["cut.png cannot be read"]),
        "mean_per_channel": (["--images", str(images), "--mean", "0.5", "0.5"], ["--mean has 2 value", "1 channel"]),
        "more_classes_than_outputs": (["--images", str(many)], ["11 class folders", "10 outputs"]),
        "missing_config": (["-c", str(tmp_path / "nowhere.yaml")], ["nowhere.yaml does not exist"]),
    }
    for name, (extra, fragments) in cases.items():
        code, stderr = main_in_process("eval", str(models["gray"]), *extra)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("sparselite: error: "), (name, stderr)
        assert all(fragment in lines[0] for fragment in fragments), (name, lines[0])


def _wait_until_mapped(proc: subprocess.Popen, path: Path, timeout: float = 90) -> None:
    """Until the CLI process has the model file mapped (LiteRT loaded it: the command itself is running)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if str(path) in Path(f"/proc/{proc.pid}/maps").read_text():
                return
        time.sleep(0.05)
    raise AssertionError(f"the command did not load {path} in time (exit {proc.poll()})")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to see the file loaded")
@pytest.mark.parametrize("command", ["bench", "eval"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_a_command_is_one_line_and_the_shells_exit_code(models, tmp_path, command, signum):
    import os

    args = {"bench": ["bench", str(models["gray"]), "--rounds", "100000", "--runs", "100"],
            "eval": ["eval", str(models["gray"]), "--split", "train"]}[command]
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "GLOG_minloglevel")}
    proc = subprocess.Popen([sys.executable, "-m", "sparselite.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**env, "OMP_NUM_THREADS": "1"})
    try:
        _wait_until_mapped(proc, models["gray"])
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr
    lines = own_stderr_lines(subprocess.CompletedProcess(args, proc.returncode, "", stderr))
    assert lines == [f"sparselite: interrupted by {signal.Signals(signum).name}"], lines
