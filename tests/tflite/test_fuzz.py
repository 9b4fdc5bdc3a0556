"""Mutated .tflite files (seeded, ~50): every entry point gives one clean error line or runs.

Each file runs in a worker process (``fuzz_worker.run_isolated``), so a native crash or a hang fails
the test for that file instead of killing pytest. The long campaign is ``benchmarks/robustness.py``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from fuzz_worker import run_isolated
from tflite_mutants import CLASSES, mutants, seed_model

N_MUTANTS = 50


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    seed = seed_model()
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "seed.tflite").write_bytes(seed)
    paths, names = [], []
    for i, mutant in enumerate(mutants(seed, N_MUTANTS, seed=0)):
        path = folder / f"{i:03d}_{mutant.kind}.tflite"
        path.write_bytes(mutant.data)
        paths.append(path)
        names.append(mutant.name)
    return folder / "seed.tflite", paths, names


def test_corpus_covers_every_class_and_is_reproducible(corpus):
    seed_path, paths, names = corpus
    assert {name.split("/")[0] for name in names} == set(CLASSES)
    again = mutants(seed_path.read_bytes(), N_MUTANTS, seed=0)
    assert [m.data for m in again] == [p.read_bytes() for p in paths]


@pytest.mark.parametrize("mode", ["litert", "reference", "reader", "inspect"])
def test_every_mutant_is_a_clean_error_or_runs(corpus, mode):
    seed_path, paths, names = corpus
    results = run_isolated(mode, [seed_path, *paths], timeout_s=30)
    assert results[0].outcome == "ran", results[0]
    bad = [(name, r.outcome, r.message) for name, r in zip(names, results[1:])
           if r.outcome not in ("ran", "error") or (r.outcome == "error" and "\n" in r.message)]
    assert not bad, bad
    # The corpus is hostile: most files must be refused, not quietly run.
    assert sum(r.outcome == "error" for r in results[1:]) >= 0.7 * N_MUTANTS


@pytest.mark.parametrize("command", ["inspect", "eval", "bench"])
def test_cli_gives_one_line_and_exit_2(corpus, command):
    _seed, paths, names = corpus
    # A table edit and a truncation through the real CLI (the in-process entry points saw all 50).
    picks = [paths[names.index(next(n for n in names if n.startswith(kind)))] for kind in ("semantic", "truncate")]
    for path in picks:
        args = [command, str(path)] + (["--rounds", "1", "--runs", "1"] if command == "bench" else [])
        done = subprocess.run([sys.executable, "-m", "sparselite.cli", *args], capture_output=True, text=True,
                              timeout=120)
        if done.returncode == 0:
            continue  # a mutation the model survives (e.g. a flipped weight bit)
        assert done.returncode == 2, (path.name, done.returncode, done.stderr[-2000:])
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sparselite: error: "), (path.name, done.stderr)
