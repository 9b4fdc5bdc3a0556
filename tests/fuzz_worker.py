"""Runs .tflite files through one sparselite entry point, one file per stdin line, one JSON line out each.

    python tests/fuzz_worker.py litert|reference|gpu|reader|inspect  < paths

(litert: ``LiteRTModel`` on XNNPACK plus one inference; reference/gpu: the same on those accelerators;
reader: sparselite's own reader and sparse decoder; inspect: ``inspect_tflite``.)

A parent (``run_isolated``) feeds it paths. If the worker dies on a file (a native crash) or stops
answering (a hang), the parent records that for the file and starts a fresh worker for the rest: one
bad file costs one process, not the whole campaign or pytest.

Outcomes: ``ran`` (and the output checksum), ``error`` (a SparseliteError: its message, which must be
one line), ``traceback`` (any other exception: a sparselite bug), ``crash``, ``hang``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

MODES = ("litert", "reference", "gpu", "reader", "inspect")


def _run_one(mode: str, path: str) -> dict:
    import numpy as np

    from sparselite.errors import SparseliteError

    try:
        if mode == "reader":
            from sparselite.tflite.constant_values import weight_sparsity

            weight_sparsity(path)  # read_model (structure + validate_model), then decode every weight
            return {"outcome": "ran", "output": None}
        if mode == "inspect":
            from sparselite.inspect import inspect_tflite

            report = inspect_tflite(path)
            report.format_table()
            return {"outcome": "ran", "output": None}
        from sparselite.runtime.litert import LiteRTModel

        accelerator = {"litert": "xnnpack"}.get(mode, mode)
        model = LiteRTModel(path, accelerator=accelerator, allow_cpu_fallback=True)
        x = np.linspace(-1, 1, int(np.prod(model.input_shape)), dtype=np.float32).reshape(model.input_shape)
        y = np.asarray(model(x), dtype=np.float64)
        return {"outcome": "ran", "output": [round(float(v), 5) for v in y.reshape(-1)[:64]]}
    except SparseliteError as err:
        return {"outcome": "error", "message": str(err)}
    except Exception as err:  # noqa: BLE001 - the point is to count what escapes
        return {"outcome": "traceback", "message": f"{type(err).__name__}: {err}"[:300],
                "where": traceback.format_exc().splitlines()[-3:]}


def _serve(mode: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Warm the imports before the first path so its timeout measures the file, not the imports.
    from sparselite.runtime.litert import LiteRTModel  # noqa: F401
    from sparselite.inspect import inspect_tflite  # noqa: F401

    # Native libraries print to fd 1 too: answers go to a private copy of it, fd 1 to /dev/null.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    answers.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        answers.write(json.dumps(_run_one(mode, line.rstrip("\n"))) + "\n")


@dataclass
class Outcome:
    outcome: str  # ran | error | traceback | crash | hang
    message: str = ""
    output: list | None = None


def run_isolated(mode: str, paths: list[Path], timeout_s: float = 20.0, env: dict | None = None) -> list[Outcome]:
    """Each path through ``mode`` in a worker process; a crash or hang costs that file only."""
    if env is None:  # the worker imports the same sparselite as its parent
        import sparselite

        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(Path(sparselite.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    results: list[Outcome] = []
    pending = list(paths)
    while pending:
        proc = subprocess.Popen([sys.executable, __file__, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=env)
        if not _read_line(proc, 120.0):
            proc.kill()
            raise RuntimeError("fuzz worker did not start")
        while pending:
            path = pending[0]
            proc.stdin.write(f"{path}\n")
            proc.stdin.flush()
            line = _read_line(proc, timeout_s)
            if line is None:
                hung = proc.poll() is None
                proc.kill()
                proc.wait()
                results.append(Outcome("hang" if hung else "crash",
                                       "" if hung else f"exit {proc.returncode}"))
                pending.pop(0)
                break
            data = json.loads(line)
            results.append(Outcome(data["outcome"], data.get("message", ""), data.get("output")))
            pending.pop(0)
        else:
            proc.stdin.close()
            proc.wait(timeout=30)
    return results


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str | None:
    """One line of the worker's stdout within ``timeout_s``, or None (it died or hung)."""
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not selector.select(left):
            return None
        line = proc.stdout.readline()
        return line or None


if __name__ == "__main__":
    _serve(sys.argv[1])
