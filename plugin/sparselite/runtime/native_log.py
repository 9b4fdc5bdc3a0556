"""Capture what native code (LiteRT's C++, Dawn) writes to file descriptor 2.

Python's ``sys.stderr`` redirection does not see it: the C++ runtime writes to the fd directly. The
GPU accelerator names the ops it refused only there, so the runtime reads them back from the capture.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def captured_native_stderr() -> Iterator[list[str]]:
    """Redirect fd 2 to a temp file inside the block; the list gets the captured text when it ends."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))
