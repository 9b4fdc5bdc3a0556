"""Mutated .tflite files through every entry point that reads one: how many end how.

    .venv/bin/python -m benchmarks.robustness [--mutants 400] [--cli 40] [--seed 0] [--json out.json]

The corpus (``tests/tflite_mutants.py``: bit flips, hostile words over offsets, truncations,
not-a-flatbuffer, semantic edits such as ``dense_size`` 2^31-1 or out-of-range sparse indices) is
generated from a small real sparse int8 export. Every file runs in a worker process with a timeout
(``tests/fuzz_worker.py``), so a native crash or a hang is counted, not suffered:

- in process: sparselite's reader (``read_model`` + sparse decode), ``inspect_tflite``, and
  ``LiteRTModel`` + one inference on XNNPACK, the reference kernels, and the GPU accelerator with
  CPU fallback (when a Vulkan driver is there);
- through the real CLI, one subprocess per file: ``sparselite inspect``, ``eval``, ``bench`` on the
  first ``--cli`` mutants.

Columns: ``clean error`` = one ``SparseliteError`` line (exit 2 from the CLI); ``ran`` = the file
loaded and ran; ``output changed`` = it ran with other logits than the seed (a valid file with other
content: a flipped weight bit; only the export report's sha256 can tell); ``silently wrong`` = it ran
although its mutation is one the checks must refuse (a semantic edit that changes the output);
``traceback`` = any other exception (or a multi-line error); ``crash`` = the process died; ``hang`` =
no answer within the timeout. The goal is 0 in the last four.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchmarks._common import environment, environment_line, quiet_logs, table, write_json

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fuzz_worker import Outcome, run_isolated  # noqa: E402
from recipe_mutants import recipe_mutants  # noqa: E402
from tflite_mutants import CLASSES, Mutant, mutants, seed_model  # noqa: E402

COLUMNS = ("tried", "clean error", "ran", "output changed", "silently wrong", "traceback", "crash", "hang")
# Semantic edits LiteRT may legitimately ignore or accept: a declared intermediate shape (recomputed at
# prepare), a reshape's option (the shape input wins), a permutation left unchanged, an op version.
SEMANTIC_ACCEPTABLE = {"huge_shape", "reshape_bad", "traversal_order_broken", "fc_op_version", "op_inputs_dropped",
                       "input_shape_huge"}


def _gpu_available() -> bool:
    from sparselite.runtime import vulkan

    return bool(os.environ.get("VK_DRIVER_FILES") or os.environ.get("VK_ICD_FILENAMES")
                or vulkan.lavapipe_installed() or vulkan.require_hw_gpu())


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "plugin"), os.environ.get("PYTHONPATH", "")]))


def _cli(command: str, path: Path, timeout_s: float) -> Outcome:
    args = {"inspect": ["inspect", str(path)], "eval": ["eval", str(path), "--limit", "256"],
            "bench": ["bench", str(path), "--rounds", "1", "--runs", "2"]}[command]
    try:
        done = subprocess.run([sys.executable, "-m", "sparselite.cli", *args], capture_output=True, text=True,
                              timeout=timeout_s, env=_env())
    except subprocess.TimeoutExpired:
        return Outcome("hang")
    if done.returncode == 0:
        return Outcome("ran", output=None)
    if done.returncode < 0 or done.returncode > 128:
        return Outcome("crash", f"exit {done.returncode}")
    lines = done.stderr.strip().splitlines()
    if done.returncode == 2 and len(lines) == 1 and lines[0].startswith("sparselite: error:"):
        return Outcome("error", lines[0])
    return Outcome("traceback", done.stderr.strip()[-300:])


def _classify(mutant: Mutant, result: Outcome, reference: list | None) -> list[str]:
    """The columns this result counts in."""
    if result.outcome == "error":
        return ["clean error"] if "\n" not in result.message else ["traceback"]
    if result.outcome != "ran":
        return [result.outcome]
    cells = ["ran"]
    if result.output is not None and reference is not None and result.output != reference:
        cells.append("output changed")
        if mutant.kind == "semantic" and mutant.name.split("/")[1] not in SEMANTIC_ACCEPTABLE:
            cells.append("silently wrong")
    return cells


RECIPE_CLASSES = ("value", "key", "file", "duplicate")


def _recipe_campaign(n: int, seed: int) -> list[tuple[Mutant, Outcome, None]]:
    """Each mutated (config, recipe) pair through the real `sparselite fit`, two at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from test_cli import own_stderr_lines

    def run(item: tuple[int, tuple[str, bytes, bytes, str]]) -> tuple[Mutant, Outcome, None]:
        index, (name, config, recipe, file_name) = item
        folder = Path(work, f"pair{index:03d}")
        (folder / file_name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_bytes(config)
        (folder / file_name).write_bytes(recipe)
        env = _env() | {"OMP_NUM_THREADS": "1"}
        try:
            done = subprocess.run([sys.executable, "-m", "sparselite.cli", "fit", "-c", str(folder / "config.yaml"),
                                   "-c", str(folder / file_name)], capture_output=True, text=True, timeout=180,
                                  env=env, cwd=folder)
        except subprocess.TimeoutExpired:
            return Mutant(name, b""), Outcome("hang"), None
        own = own_stderr_lines(done)
        if done.returncode == 0:
            outcome = Outcome("ran")
        elif done.returncode < 0 or done.returncode > 128:
            outcome = Outcome("crash", f"exit {done.returncode}")
        elif done.returncode == 2 and len(own) == 1 and own[0].startswith("sparselite: error:") \
                and "Traceback" not in done.stderr:
            outcome = Outcome("error", own[0])
        else:
            outcome = Outcome("traceback", " | ".join(own[-3:])[-300:])
        return Mutant(name, b""), outcome, None

    with tempfile.TemporaryDirectory(prefix="sparselite-recipes-") as work, ThreadPoolExecutor(2) as pool:
        return list(pool.map(run, enumerate(recipe_mutants(n, seed, Path(work)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mutants", type=int, default=400, help="mutated files (spread evenly over the classes)")
    parser.add_argument("--cli", type=int, default=40, help="of those, how many go through each CLI command")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before a file counts as a hang")
    parser.add_argument("--recipes", type=int, default=100,
                        help="mutated config+recipe pairs through `sparselite fit` (3 steps each); 0 skips")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    quiet_logs()
    env = environment()
    print(environment_line(env))
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # litert-torch prints its conversion progress
        seed = seed_model()
    corpus = mutants(seed, args.mutants, seed=args.seed)
    modes = ["reader", "inspect", "litert", "reference"] + (["gpu"] if _gpu_available() else [])
    counts: dict[tuple[str, str], Counter] = {}
    examples: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="sparselite-robustness-") as folder:
        seed_path = Path(folder, "seed.tflite")
        seed_path.write_bytes(seed)
        paths = []
        for i, mutant in enumerate(corpus):
            paths.append(Path(folder, f"{i:04d}.tflite"))
            paths[-1].write_bytes(mutant.data)
        runs: dict[str, list[tuple[Mutant, Outcome, list | None]]] = {}
        for mode in modes:
            results = run_isolated(mode, [seed_path, *paths], timeout_s=args.timeout, env=_env())
            runs[mode] = [(m, r, results[0].output) for m, r in zip(corpus, results[1:])]
        picked = range(min(args.cli, len(corpus)))  # the corpus cycles through the classes: all are covered
        for command in ("inspect", "eval", "bench"):
            name = f"cli {command}"
            runs[name] = [(corpus[i], _cli(command, paths[i], args.timeout), None) for i in picked]
        if args.recipes:
            runs["fit (recipes)"] = _recipe_campaign(args.recipes, args.seed)
        for entry, rows in runs.items():
            for mutant, result, reference in rows:
                counter = counts.setdefault((entry, mutant.kind), Counter())
                counter["tried"] += 1
                for cell in _classify(mutant, result, reference):
                    counter[cell] += 1
                    if cell in ("silently wrong", "traceback", "crash", "hang"):
                        examples.setdefault(entry, []).append(f"{mutant.name}: {cell} {result.message[:160]}")
    entries = [entry for entry in runs if runs[entry]]
    rows = []
    for entry in entries:
        total = Counter()
        kinds = RECIPE_CLASSES if entry == "fit (recipes)" else CLASSES
        for kind in kinds:
            counter = counts.get((entry, kind), Counter())
            total.update(counter)
            rows.append([entry, kind] + [str(counter[c]) for c in COLUMNS])
        rows.append([entry, "ALL"] + [str(total[c]) for c in COLUMNS])
    print(f"\n{args.recipes} mutated config+recipe pairs through `sparselite fit`; "
          f"{args.mutants} mutants of a {len(seed)}-byte sparse int8 export (seed {args.seed}), "
          f"{args.cli} of them through each CLI command; timeout {args.timeout:.0f} s per file"
          + ("" if "gpu" in modes else "; GPU skipped (no Vulkan driver)"))
    print(table(["entry point", "input class", *COLUMNS], rows, left=(0, 1)))
    bad = sum(int(r[COLUMNS.index(c) + 2]) for r in rows if r[1] == "ALL"
              for c in ("silently wrong", "traceback", "crash", "hang"))
    print(f"\nsilently wrong + traceback + crash + hang, all entry points: {bad} "
          f"({time.perf_counter() - start:.0f} s)")
    for entry, lines in examples.items():
        for line in lines[:10]:
            print(f"  {entry}: {line}")
    write_json(args.json, {"environment": env, "mutants": args.mutants, "cli": args.cli, "seed": args.seed,
                           "table": [dict(zip(["entry point", "input class", *COLUMNS], r)) for r in rows],
                           "examples": examples})


if __name__ == "__main__":
    main()
