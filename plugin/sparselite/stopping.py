"""How a command stops on a signal: one exception family that the CLI turns into one line and the shell's
exit code (128 + the signal's number).

- ``Stopped``: the base. A ``BaseException``, so that no ``except Exception`` swallows it.
- ``Terminated``: SIGTERM outside training (``raise_on_sigterm`` installs the handler that raises it;
  SIGINT already raises ``KeyboardInterrupt``).
- ``interrupts.Interrupted``: SIGINT/SIGTERM during training, after a checkpoint was saved.

Kept free of heavy imports: the CLI installs the handler before it imports anything else.
"""

from __future__ import annotations

import signal
from types import FrameType


class Stopped(BaseException):
    """A command stopped on a signal."""

    signum: int

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Terminated(Stopped):
    """SIGTERM (or another terminating signal) arrived outside training."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


def raise_on_sigterm() -> None:
    """From now on, SIGTERM raises ``Terminated`` in the main thread (instead of killing the process
    without a word). Training replaces the handler while it runs (``interrupts.GracefulInterrupt``) and
    puts it back when it ends."""
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (main() called from a thread): leave signals alone
        pass
