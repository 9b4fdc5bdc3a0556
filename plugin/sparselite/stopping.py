"""How a command stops on a signal: one exception family that the CLI turns into one line and the shell's
exit code (128 + the signal's number).

- ``Stopped``: the base. A ``BaseException``, so that no ``except Exception`` swallows it.
- ``Terminated``: SIGTERM outside training (``raise_on_signals`` installs the handlers that raise it, and
  ``KeyboardInterrupt`` for SIGINT, until the CLI reports the signal: ``signal_reported``).
- ``interrupts.Interrupted``: SIGINT/SIGTERM during training, after a checkpoint was saved.
- ``forget_caught_keyboard_interrupt``: lets ``python -m sparselite.cli`` exit with the code the CLI chose
  after a Ctrl-C that it caught (docs/upstream/cpython_caught_keyboard_interrupt.md).

Kept free of heavy imports: the CLI installs the handler before it imports anything else.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


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


RAISE_AGAIN_AFTER_S = 2.0  # longer than unwinding takes, so that a second exception is rare


class _Pending:
    """The first signal since ``raise_on_signals`` whose exception the CLI has not reported yet."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.reported = threading.Event()


_pending = _Pending()


def _raise_for_signal(signum: int, frame: FrameType | None) -> None:
    if _pending.signum is None:
        _pending.signum = signum
        threading.Thread(target=_raise_again_while_unreported, args=(signum, _pending.reported), daemon=True).start()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _raise_again_while_unreported(signum: int, reported: threading.Event) -> None:
    """Code that catches every exception, or C code that clears one, can lose the exception a handler raised
    (seen: one that landed in the import of numpy's Cython ``random._generator`` never surfaced), and the
    command would run on as if the signal never came. Until the CLI reports it (``signal_reported``), raise
    it again every ``RAISE_AGAIN_AFTER_S``, as if it came again."""
    while not reported.wait(RAISE_AGAIN_AFTER_S):
        handler = signal.getsignal(signum)
        if not callable(handler):  # the default action or ignored now: not ours to repeat
            return
        signal.pthread_kill(threading.main_thread().ident, signum)  # a real signal: it also ends a blocking call
        if handler is not _raise_for_signal:  # training took the signal over: its handler records it once
            return


def raise_on_signals() -> dict[int, Any]:
    """From now on, SIGINT raises ``KeyboardInterrupt`` and SIGTERM ``Terminated`` in the main thread (SIGTERM
    would otherwise kill the process without a word), again and again until the CLI reports the signal.
    Training replaces the handlers while it runs (``interrupts.GracefulInterrupt``) and puts them back when
    it ends. Returns the handlers before, for ``restore_handlers``."""
    global _pending
    signal_reported()  # an earlier call's signal, if any: its thread stops
    _pending = _Pending()
    try:
        return {signum: signal.signal(signum, _raise_for_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (main() called from a thread): leave signals alone
        return {}


def restore_handlers(previous: dict[int, Any]) -> None:
    """Put back the handlers ``raise_on_signals`` replaced (a caller of ``cli.main`` in process keeps its own)."""
    signal_reported()
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def signal_reported() -> None:
    """The CLI has caught the signal's exception and is reporting it: raise it no more."""
    _pending.reported.set()


def forget_caught_keyboard_interrupt() -> None:
    """Call after catching a ``KeyboardInterrupt``, before ``sys.exit``: CPython otherwise may still end the
    process by SIGINT (return code -2, not 130).

    CPython (here 3.11) sets a process-wide "unhandled KeyboardInterrupt" flag whenever one
    leaves code run by ``exec`` of a string, caught later or not; under ``python -m`` the interpreter
    checks that flag after finalizing and, if set, kills itself with SIGINT. Imports the CLI makes after
    loading a model run such an ``exec`` (scipy's ``array_api_compat`` does ``exec("from numpy import
    *")``), so a Ctrl-C that lands there ends the run by signal about one time in six. Each ``exec`` of a
    string clears the flag on entry, so an empty one forgets the caught interrupt.
    """
    exec("pass", {})  # noqa: S102 - a constant, run for its side effect on the interpreter's flag
