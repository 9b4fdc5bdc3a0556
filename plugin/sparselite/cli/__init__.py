"""``sparselite fit|validate|test|export|shrink|eval|bench|inspect|demo``.

fit/validate/test are LightningCLI: ``sparselite fit -c configs/<model+data>.yaml -c recipes/<compression>.yaml``.
Bad input of any kind ends in one line on stderr and exit code 2, before training starts.
-v/--verbose (anywhere on the line) shows the libraries' own log lines, which are hidden by default.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sparselite.cli.commands import (
    add_bench_parser, add_demo_parser, add_export_parser, add_inspect_parser, add_shrink_parser,
)
from sparselite.cli.errors import _explain, _fail, _first_line, _sparselite_cause
from sparselite.cli.evaluate import add_eval_parser
from sparselite.cli.report import add_report_parser
from sparselite.cli.sensitivity import add_sensitivity_parser
from sparselite.errors import SparseliteError

LIGHTNING_COMMANDS = ("fit", "validate", "test")
VERBOSE_FLAGS = ("-v", "--verbose")


def _lightning(args: list[str]) -> None:
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from sparselite.interrupts import Interrupted
    from sparselite.lightning_cli import build_lightning_cli
    from sparselite.stopping import signal_reported

    try:
        build_lightning_cli(args)
    except Interrupted as stop:
        signal_reported()
        print(f"sparselite: interrupted by {stop}; resume with --ckpt_path {stop.checkpoint}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except ArgumentError as err:
        _fail(_explain(err))
    except MisconfigurationException as err:
        # Lightning's own check of a Trainer argument (max_steps: -5, devices: 0, accelerator: gpu
        # without one), raised while the Trainer is built, before any training.
        _fail(f"trainer: {_first_line(err)}")
    except ValueError as err:
        # jsonargparse wraps a SparseliteError raised in a class's __init__ (instantiation) in a ValueError.
        if _sparselite_cause(err) is None:
            raise
        _fail(_explain(err))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparselite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="show the libraries' log lines (also after the command)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name}: -c configs/X.yaml -c recipes/Y.yaml", add_help=False)
    for add in (add_export_parser, add_shrink_parser, add_eval_parser, add_bench_parser, add_inspect_parser,
                add_report_parser, add_sensitivity_parser, add_demo_parser):
        add(sub)
    return parser


class _ProgressLines(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (a caller may have swapped it since)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("[sparselite] %(message)s"))

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one; the property ignores it
        pass


def _show_progress() -> None:
    """sparselite's own progress (the export's stages, its parity batches) as plain lines on stdout, like
    training's ``[sparselite] step ...`` lines; stderr stays for the one error line."""
    logger = logging.getLogger("sparselite")
    if any(isinstance(handler, _ProgressLines) for handler in logger.handlers):
        return
    logger.addHandler(_ProgressLines())
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a root handler set up elsewhere would print each line twice


def main(argv: list[str] | None = None) -> None:
    from sparselite.stopping import (
        Stopped, forget_caught_keyboard_interrupt, raise_on_signals, restore_handlers, signal_reported,
    )

    previous_handlers = raise_on_signals()  # SIGINT/SIGTERM anywhere below: one line and exit 130/143
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(arg in VERBOSE_FLAGS for arg in argv)
    argv = [arg for arg in argv if arg not in VERBOSE_FLAGS]
    native_filter = None
    if not verbose:
        from sparselite.quiet import NativeStderrFilter, quiet_libraries

        quiet_libraries()  # before anything heavy is imported
        native_filter = NativeStderrFilter()
        native_filter.start()
    _show_progress()
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            _lightning(argv)
            return
        ns = _parser().parse_args(argv)
        ns.func(ns)
    except SparseliteError as err:
        _fail(str(err))
    except argparse.ArgumentError as err:  # a run's configs, read again by export, shrink, eval -c, sensitivity
        _fail(_explain(err))
    except Stopped as stop:  # a signal: in training (Interrupted, with its checkpoint) or outside (Terminated)
        signal_reported()
        print(f"sparselite: interrupted by {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:  # Ctrl+C outside training (imports, export): the shell's code, no traceback
        signal_reported()
        print("sparselite: interrupted by SIGINT", file=sys.stderr)
        forget_caught_keyboard_interrupt()
        sys.exit(130)
    finally:
        restore_handlers(previous_handlers)
        if native_filter is not None:
            native_filter.stop()

