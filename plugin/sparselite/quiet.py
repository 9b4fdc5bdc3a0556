"""Quiet output for the command line: sparselite's own lines and Lightning's progress and summary, not
the log lines of the libraries under them, which a user cannot act on. ``-v/--verbose`` skips this.

Each kind of noise is stopped where it starts, when it can be:
  - native logs (absl/TF C++: oneDNN, ``flatbuffer_export.cc``): log levels in the environment, set
    before those libraries load;
  - litert-torch's ``[START]/[DONE] LiteRT-Torch Convert`` progress: its own switch (an env var);
  - Python logging and warnings (torchao's "Failed to load ..._C_mxfp8", Lightning's tips and its
    tensorboardX notice, torch's ``LeafSpec`` deprecation): logger levels, filters and warning filters.
What is left, lines native code writes to fd 2 without a switch (TFLite's "Created TensorFlow Lite
XNNPACK delegate", LiteRT's accelerator registry), is filtered line by line on its way to stderr.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import warnings

_ENVIRONMENT = {
    "TF_CPP_MIN_LOG_LEVEL": "2",  # absl/TF C++: errors only
    "GLOG_minloglevel": "2",
    "LITERT_TORCH_SHOW_PROGRESS": "n",
}
# Python loggers whose warnings are about the environment, not the user's run.
_QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "absl")
_LIGHTNING_INFO = re.compile(r"^(💡 Tip:|[GTH]PU available: )")
_DROPPED_MESSAGES = {
    "": re.compile(r"^Your model .*is converted in training mode"),  # litert-torch, about sparselite's own pt2e graph
    # Lightning's rank_zero_info logs through one of these, whichever of its packages loaded last: its
    # tips, and the accelerator inventory (the config says which device trains; a GPU that is there
    # but unused still gets Lightning's own warning, which is not dropped).
    "lightning.fabric.utilities.rank_zero": _LIGHTNING_INFO,
    "lightning.pytorch.utilities.rank_zero": _LIGHTNING_INFO,
    "lightning.fabric.utilities.seed": re.compile(r"^Seed set to "),  # the config's own seed_everything value
}
_IGNORED_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",
)
_NATIVE_NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\)"
    rb"|[IW]\d{4} [\d:. ]+\s*\d+ \S+\.cc:\d+\]"
    rb"|INFO: Created TensorFlow Lite XNNPACK delegate"
    rb"|INFO: \[\S+\.cc:\d+\] )"
)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


class NativeStderrFilter:
    """Pipes fd 2 through a thread that drops ``_NATIVE_NOISE`` lines and passes the rest on at once."""

    def __init__(self) -> None:
        self._saved: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        sys.stderr.flush()
        self._saved = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(target=self._pump, args=(read_end, os.dup(self._saved)), daemon=True)
        self._thread.start()

    @staticmethod
    def _pump(read_end: int, out: int) -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not _NATIVE_NOISE.match(line))
            if b"\r" in pending:  # a progress bar redrawing its line: pass it on now
                kept, pending = kept + pending, b""
            if kept:
                os.write(out, kept)
        if pending and not _NATIVE_NOISE.match(pending):
            os.write(out, pending)
        os.close(read_end)
        os.close(out)

    def stop(self) -> None:
        if self._saved is None:
            return
        sys.stderr.flush()
        os.dup2(self._saved, 2)  # closes the pipe's write end, so the thread drains it and ends
        os.close(self._saved)
        self._saved = None
        if self._thread is not None:
            self._thread.join(timeout=2)  # a forked child may still hold the pipe; don't wait for it


def quiet_libraries() -> None:
    """Log levels, filters and warning filters; call before the libraries are imported."""
    for name, value in _ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, pattern in _DROPPED_MESSAGES.items():
        logging.getLogger(name).addFilter(_DropMatching(pattern))
    for message in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
