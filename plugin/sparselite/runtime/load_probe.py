"""Load a .tflite in a child process first, so that a native crash in LiteRT becomes one error line.

``tflite.validate`` checks every value LiteRT's kernels are known to trust, but a damaged or hostile
file can still reach a C++ path nobody has met yet (a double free in the interpreter's set-up, a
segfault in a delegate). Such a crash cannot be caught in the process it happens in. So before a
file that sparselite did not just write is loaded in this process, a child process loads it the
same ways (XNNPACK, then the reference kernels), allocates its tensors and runs it once on zeros.
If the child dies on a signal or does not finish in time, the file is refused with a
``SparseliteError``; otherwise the caller loads it (any ordinary LiteRT error is then raised, and
reported, in the caller).

The verdict is cached per (path, inode, size, mtime) for the life of the process, and
``mark_written`` records a file sparselite has just written, so a file costs at most one probe
(about 0.5 s: a bare Python start plus ``ai_edge_litert``; the child does not import sparselite).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from sparselite.errors import SparseliteError

TIMEOUT_S = float(os.environ.get("SPARSELITE_PROBE_TIMEOUT_S", "60"))

# Runs with ``python -I -c``: no sparselite import, no cwd on sys.path. Prints the stage it enters, so
# the parent can say where the crash happened.
_CHILD = r"""
import sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType
path = sys.argv[1]
for stage, resolver in (("xnnpack", OpResolverType.AUTO), ("reference", OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)):
    print(stage, flush=True)
    try:
        interpreter = Interpreter(model_path=path, num_threads=1, experimental_op_resolver_type=resolver)
        interpreter.allocate_tensors()
        for detail in interpreter.get_input_details():
            interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], dtype=detail["dtype"]))
        interpreter.invoke()
    except Exception:  # an ordinary error: the caller meets it again, in process, and reports it
        pass
print("done", flush=True)
"""

_lock = threading.Lock()
_verdicts: dict[tuple, str | None] = {}  # key -> None (safe to load) or the error message


def _key(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)


def mark_written(path: str | Path) -> None:
    """``path`` was just written by sparselite itself: loading it needs no probe."""
    with _lock:
        _verdicts[_key(Path(path))] = None


def check_loads(path: str | Path) -> None:
    """Raise ``SparseliteError`` if loading ``path`` crashes or hangs LiteRT (probed once per file version)."""
    path = Path(path)
    key = _key(path)
    with _lock:
        if key in _verdicts:
            verdict = _verdicts[key]
            if verdict is not None:
                raise SparseliteError(verdict)
            return
    verdict = _probe(path)
    with _lock:
        _verdicts[key] = verdict
    if verdict is not None:
        raise SparseliteError(verdict)


def _probe(path: Path) -> str | None:
    """None if a child process loads and runs ``path`` without dying, else the error line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(LIBC_FATAL_STDERR_="1", TF_CPP_MIN_LOG_LEVEL="3", GLOG_minloglevel="3", OMP_NUM_THREADS="1")
    try:
        done = subprocess.run([sys.executable, "-I", "-c", _CHILD, str(path)], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as err:
        stage = _last_stage(err.stdout)
        return (f"{path}: LiteRT did not finish loading it within {TIMEOUT_S:.0f} s ({stage}); the file is damaged "
                "or not a model LiteRT can run; re-export it")
    if done.returncode == 0 and done.stdout.rstrip().endswith("done"):
        return None
    stage = _last_stage(done.stdout)
    if done.returncode == -signal.SIGINT:  # Ctrl-C reached the child too: the user's interrupt, not a verdict
        raise KeyboardInterrupt
    if done.returncode < 0:
        try:
            how = signal.Signals(-done.returncode).name
        except ValueError:
            how = f"signal {-done.returncode}"
        return f"{path}: LiteRT crashed while loading it ({how} in {stage}); the file is damaged or hostile; re-export it"
    if "ModuleNotFoundError" in done.stderr or "ImportError" in done.stderr:
        return None  # the child could not import LiteRT (an odd environment): no verdict, load in process
    return f"{path}: LiteRT failed while loading it (exit {done.returncode} in {stage}); re-export it"


def _last_stage(stdout: str | bytes | None) -> str:
    if isinstance(stdout, bytes):
        stdout = stdout.decode(errors="replace")
    lines = (stdout or "").split()
    return f"the {lines[-1]} load" if lines and lines[-1] in ("xnnpack", "reference") else "start-up"
