"""How a command stops on a signal: one exception family that the CLI turns into one line and the shell's
exit code (128 + the signal's number).

- ``Stopped``: the base. A ``BaseException``, so that no ``except Exception`` swallows it.
- ``Terminated``: SIGTERM outside training (``raise_on_sigterm`` installs the handler that raises it;
  SIGINT already raises ``KeyboardInterrupt``).
- ``interrupts.Interrupted``: SIGINT/SIGTERM during training, after a checkpoint was saved.
- ``forget_caught_keyboard_interrupt``: lets ``python -m sparselite.cli`` exit with the code the CLI chose
  after a Ctrl-C that it caught (docs/upstream/cpython_caught_keyboard_interrupt.md).

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


def forget_caught_keyboard_interrupt() -> None:
    """Call after catching a ``KeyboardInterrupt``, before ``sys.exit``: CPython otherwise may still end the
    process by SIGINT (return code -2, not 130).

    CPython (3.8 to at least 3.11) sets a process-wide "unhandled KeyboardInterrupt" flag whenever one
    leaves code run by ``exec`` of a string, caught later or not; under ``python -m`` the interpreter
    checks that flag after finalizing and, if set, kills itself with SIGINT. Imports the CLI makes after
    loading a model run such an ``exec`` (scipy's ``array_api_compat`` does ``exec("from numpy import
    *")``), so a Ctrl-C that lands there ends the run by signal about one time in six. Each ``exec`` of a
    string clears the flag on entry, so an empty one forgets the caught interrupt.
    """
    exec("pass", {})  # noqa: S102 - a constant, run for its side effect on the interpreter's flag
