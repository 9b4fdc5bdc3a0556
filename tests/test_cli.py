"""The `sparselite` command: bad input ends in exit code 2 and one error line, before training starts."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "fmnist_mobilenet.yaml")
# A bad input must fail fast: before any training step (imports alone take ~10 s on the CI box).
FAST_S = 120

# stderr lines that are not sparselite's: import-time logging of TF/absl/torchao/torch (printed by
# `import sparselite`, before the CLI runs) and Lightning's own start-up logging and warnings.
FOREIGN = [
    r"^WARNING: All log messages before absl::InitializeLog\(\)",
    r"^[IWE]\d{4} [\d:. ]+\s*\d+ \S+\.(cc|py):\d+\]",
    r"^Failed to load .*torchao",
    r"^Seed set to \d+$",
    r"^(GPU|TPU|HPU) available:",
    r"^💡 Tip:",
    r"^\S+\.py:\d+: ",  # Python warnings (Lightning's rank_zero_warn format)
]


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = FAST_S) -> subprocess.CompletedProcess:
    # The CLI quiets the libraries itself: pytest's own settings (conftest) must not leak into it.
    inherited = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "GLOG_minloglevel")}
    full_env = {**inherited, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sparselite.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or ROOT, timeout=timeout)


def own_stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return [line for line in lines if not any(re.search(p, line) for p in FOREIGN)]


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = own_stderr_lines(result)
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith("sparselite: error: "), line
    assert line == result.stderr.rstrip("\n").splitlines()[-1]  # the error is the last thing printed
    for fragment in fragments:
        assert fragment in line, line
    assert "Epoch" not in result.stdout + result.stderr  # no training started
    return line


def recipe(tmp_path: Path, name: str, init_args: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        "trainer:\n  callbacks:\n    - class_path: sparselite.GradualPruning\n      init_args:\n"
        + textwrap.indent(textwrap.dedent(init_args).strip() + "\n", " " * 8)
    )
    return str(path)


# `sparselite fit` cases: name -> (recipe init_args or None, extra args, extra env, fragments of the error line)
FIT_CASES = {
    "unknown_key": ("final_sparsty: 0.8", [], {}, ["final_sparsty", "not accepted", "GradualPruning"]),
    "wrong_type": ("final_sparsity: abc", [], {}, ['"final_sparsity"', "float", "abc"]),
    "sparsity_out_of_range": ("final_sparsity: 1.5", [], {}, ["final_sparsity=1.5 is outside [0, 1)"]),
    "begin_after_end": ("begin_step: 500\nend_step: 100", [], {}, ["begin_step=500 must be below end_step=100"]),
    "include_matches_nothing": ('include: ["model\\\\.nothing.*"]', [], {}, ["include pattern 'model\\.nothing.*' matches no module"]),
    "missing_dataset_arg": (None, ["--data.init_args.root", "/nonexistent"], {},
                            ["Fashion-MNIST not found in /nonexistent", "apt-get install dataset-fashion-mnist"]),
    "missing_dataset_env": (None, [], {"SPARSELITE_DATA": "/nonexistent"},
                            ["Fashion-MNIST not found in /nonexistent", "apt-get install dataset-fashion-mnist"]),
    # Values that compare as "fine" (NaN), or that Lightning itself refuses while building the Trainer.
    "power_nan": ("power: .nan", [], {}, ["power=nan must be a finite number"]),
    "lr_nan": (None, ["--model.init_args.lr", ".nan"], {}, ["lr=nan must be a finite number > 0"]),
    "weight_decay_negative": (None, ["--model.init_args.weight_decay", "-0.1"], {}, ["weight_decay=-0.1"]),
    "train_subset_zero": (None, ["--data.init_args.train_subset", "0"], {}, ["train_subset=0 must be >= 1"]),
    "num_workers_negative": (None, ["--data.init_args.num_workers", "-1"], {}, ["num_workers=-1 must be >= 0"]),
    "max_steps_negative": (None, ["--trainer.max_steps", "-5"], {}, ["trainer:", "max_steps", "-5"]),
    "no_run_length": (None, ["--trainer.max_steps", "-1"], {}, ["the run has no length", "set trainer.max_steps"]),
    "devices_zero": (None, ["--trainer.devices", "0"], {}, ["trainer:", "devices"]),
    "root_dir_under_a_file": (None, ["--trainer.default_root_dir", str(ROOT / "pyproject.toml" / "run")], {},
                              ["trainer.default_root_dir=", "is not a writable folder"]),
}

# Config files that must be refused before jsonargparse walks them: name -> (content, error fragments).
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
CONFIG_FILE_CASES = {
    "alias_bomb": (ALIAS_BOMB, ["expands to more than", "YAML nodes"]),
    "huge_config": ("model:\n" + "  # padding\n" * 40_000, ["KiB; configs and recipes are limited to"]),
    "binary_config": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", ["not a UTF-8 text file"]),
    "max_steps_null": ("trainer:\n  max_steps: null\n", ["trainer.max_steps=None must be a whole number"]),
    "two_pruning_callbacks": ("trainer:\n  callbacks:\n    - class_path: sparselite.GradualPruning\n"
                              "    - class_path: sparselite.GradualPruning\n", ["two GradualPruning callbacks"]),
    "renamed_key": ("trainer:\n  callbacks:\n    - class_path: sparselite.QuantizationAwareTraining\n"
                    "      init_args:\n        start_step: 10\n", ["start_step is now named begin_step"]),
}


@pytest.fixture(scope="module")
def failures(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, list[str]]]:
    """Every bad command once, two at a time (each run is mostly single-threaded imports):
    name -> (result, fragments its error line must contain)."""
    tmp_path = tmp_path_factory.mktemp("cli_failures")
    corrupt = tmp_path / "corrupt.tflite"
    corrupt.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\xff" * 100)
    missing = tmp_path / "missing.tflite"
    commands = {"inspect_corrupt_file": (["inspect", str(corrupt)], {}, [str(corrupt), "corrupt"]),
                "eval_missing_file": (["eval", str(missing)], {}, [str(missing), "does not exist"])}
    for name, (content, fragments) in CONFIG_FILE_CASES.items():
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        commands[name] = (["fit", "-c", CONFIG, "-c", str(path)], {}, fragments)
    for name, (init_args, extra, env, fragments) in FIT_CASES.items():
        args = ["fit", "-c", CONFIG]
        if init_args is not None:
            args += ["-c", recipe(tmp_path, name, init_args)]
        commands[name] = ([*args, "--trainer.default_root_dir", str(tmp_path / name), *extra], env, fragments)

    def run(name: str) -> subprocess.CompletedProcess:
        args, env, _ = commands[name]
        return run_cli(*args, env=env)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return {name: (result, commands[name][2]) for name, result in zip(commands, pool.map(run, commands))}


@pytest.mark.parametrize("name", [*FIT_CASES, *CONFIG_FILE_CASES, "inspect_corrupt_file", "eval_missing_file"])
def test_bad_input_is_one_line_on_stderr_and_exit_2(failures, name):
    result, fragments = failures[name]
    assert_one_line_error(result, *fragments)


@pytest.mark.slow
def test_fit_then_export_round_trip(tmp_path):
    compression = tmp_path / "compression.yaml"
    compression.write_text(textwrap.dedent("""
        trainer:
          callbacks:
            - class_path: sparselite.GradualPruning
              init_args:
                final_sparsity: 0.5
                begin_step: 0
                end_step: 10
                frequency: 5
            - class_path: sparselite.QuantizationAwareTraining
              init_args:
                begin_step: 6
                freeze_step: 18
    """))
    root = tmp_path / "run"
    fit = run_cli("fit", "-c", CONFIG, "-c", str(compression), "--trainer.default_root_dir", str(root),
                  "--trainer.max_steps", "20", "--trainer.val_check_interval", "20", "--trainer.limit_val_batches", "2",
                  "--data.init_args.train_subset", "1280", "--data.init_args.batch_size", "64", timeout=400)
    assert fit.returncode == 0, fit.stderr[-3000:]
    # No Lightning tips, accelerator inventory or seed line, no "Epoch 0/-2".
    for noise in ("Tip:", "GPU available", "Seed set to"):
        assert noise not in fit.stderr, fit.stderr[-2000:]
    assert "/-2" not in fit.stdout
    (ckpt,) = root.glob("lightning_logs/version_*/checkpoints/*.ckpt")
    assert (ckpt.parents[1] / "config.yaml").is_file()

    out = tmp_path / "model.tflite"
    export = run_cli("export", str(ckpt), "-o", str(out), "--verify-batches", "2", "--calibration-batches", "1", timeout=400)
    assert export.returncode == 0, export.stderr[-3000:]
    assert out.is_file() and "parity vs fake-quant torch" in export.stdout
    assert_quiet(export)
    # Progress: one line per stage, and per parity batch, on stdout.
    progress = [line for line in export.stdout.splitlines() if line.startswith("[sparselite] export")]
    assert [line.split()[2] for line in progress if line.split()[2][0].isdigit()] == [f"{n}/7" for n in range(1, 8)]
    assert sum("verify batch" in line for line in progress) == 2 and "[sparselite] export: wrote" in progress[-2]
    assert "against the fp32 file" in progress[-1]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["latency"]["ratio"] > 0 and report["fp32_bytes"] > report["file_bytes"]
    assert report["io_dtype"] == "float32" and report["ranges_learned"] > 0
    assert report["parity"]["examples"] == 128 and report["parity"]["top1_agreement"] >= 0.98
    assert report["layers"] and all(abs(l["sparsity_in_file"] - 0.5) < 0.01 for l in report["layers"])
    # The report describes exactly this file; the file has the user's umask (the test runs with 022 or so).
    assert report["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    # precision auto: measured once, its table printed, its choice stored in the checkpoint and reused.
    auto = tmp_path / "auto.tflite"
    flags = ("--precision", "auto", "--verify-batches", "1", "--calibration-batches", "1")
    first = run_cli("export", str(ckpt), "-o", str(auto), *flags, timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "precision auto: the " in first.stdout and "reason" in first.stdout  # the table's header
    assert f"the choice is stored in {ckpt}" in first.stdout
    chosen = json.loads(auto.with_suffix(".json").read_text())["precision_choice"]
    written = auto.read_bytes()
    second = run_cli("export", str(ckpt), "-o", str(auto), *flags, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"the choice stored in {ckpt} (precision={chosen['precision']!r})" in second.stdout
    assert auto.read_bytes() == written

    # Outputs that would overwrite something other than a model are refused before the checkpoint loads.
    (tmp_path / "folder.tflite").mkdir()
    (tmp_path / "notes.tflite").write_text("not a model")
    for bad, fragment in (("out.json", "must end in .tflite"), ("folder.tflite", "is a folder"),
                          ("notes.tflite", "is not a .tflite model")):
        assert_one_line_error(run_cli("export", str(ckpt), "-o", str(tmp_path / bad)), fragment)
    assert (tmp_path / "notes.tflite").read_text() == "not a model"
    # A config naming a class this Python cannot import (a callback from the user's own package).
    config = ckpt.parents[1] / "config.yaml"
    foreign = tmp_path / "foreign.yaml"
    foreign.write_text(config.read_text().replace("class_path: sparselite.QuantizationAwareTraining",
                                                  "class_path: their_package.Callback", 1))
    assert_one_line_error(run_cli("export", str(ckpt), "-c", str(foreign), "-o", str(tmp_path / "f.tflite")),
                          "No module named 'their_package'")

    evaluated = run_cli("eval", str(out), "--limit", "256", "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["examples"] == 256 and 0.0 <= result["accuracy"] <= 1.0

    # -v/--verbose brings the libraries' own lines back.
    quiet, verbose = run_cli("inspect", str(out)), run_cli("inspect", str(out), "--verbose")
    assert quiet.returncode == verbose.returncode == 0, verbose.stderr[-3000:]
    assert "XNNPACK delegate" not in quiet.stderr and "XNNPACK delegate" in verbose.stderr


def assert_quiet(result: subprocess.CompletedProcess) -> None:
    """Nothing on stderr a user cannot act on: no library load failures, tips, warnings or converter progress."""
    for noise in ("Failed to load", "Tip:", "Warning", "warn", "WARNING", "absl", "oneDNN", "flatbuffer_export"):
        assert noise not in result.stderr, result.stderr[-3000:]
    assert "LiteRT-Torch Convert" not in result.stdout + result.stderr


def test_float_fallback_takes_an_optional_runtime():
    from sparselite.cli import _parser

    def parsed(*flags):
        return _parser().parse_args(["export", "run.ckpt", *flags]).float_fallback

    assert (parsed(), parsed("--float-fallback"), parsed("--float-fallback", "xnnpack")) == (False, True, "xnnpack")
    with pytest.raises(SystemExit) as info:
        parsed("--float-fallback", "gpu")
    assert info.value.code == 2
