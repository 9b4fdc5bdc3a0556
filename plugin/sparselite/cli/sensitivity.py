"""``sparselite sensitivity``: prune each layer alone over a grid, measure, and write a recipe of per-layer
targets (the work: ``sensitivity_run.py``, loaded when the command runs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sparselite.cli.errors import _explain, _fail, _sparselite_cause
from sparselite.errors import SparseliteError


def sensitivity_command(ns: argparse.Namespace) -> None:
    """Prune each layer alone over a grid, measure, and write a recipe of per-layer targets (cli/sensitivity.py)."""
    from jsonargparse import ArgumentError

    from sparselite.pruning.sensitivity import StopOnSignal, SweepInterrupted, parse_grid

    out = Path(ns.out)
    try:
        with StopOnSignal():
            from sparselite.cli.sensitivity_run import SensitivitySettings, run_sensitivity

            if ns.target is not None and not 0.0 <= ns.target < 1.0:
                raise SparseliteError(f"--target {ns.target} must be a sparsity in [0, 1)")
            for name in ("pretrain_steps", "fine_tune_steps", "val_batches"):
                if getattr(ns, name) is not None and getattr(ns, name) < 0:
                    raise SparseliteError(f"--{name.replace('_', '-')} {getattr(ns, name)} must be >= 0")
            run_sensitivity(SensitivitySettings(
                configs=ns.config, out=out, target=ns.target, grid=parse_grid(ns.grid), checkpoint=ns.checkpoint,
                pretrain_steps=ns.pretrain_steps, fine_tune_steps=ns.fine_tune_steps, fine_tune_lr=ns.fine_tune_lr,
                val_batches=ns.val_batches or None, recipe=Path(ns.recipe) if ns.recipe else None))
    except SweepInterrupted as stop:
        print(f"sparselite: interrupted by {stop}; points measured so far are kept in {out / 'sensitivity.json'}: "
              "the same command goes on from there", file=sys.stderr)
        sys.exit(stop.exit_code)
    except ArgumentError as err:
        _fail(_explain(err))
    except ValueError as err:
        if _sparselite_cause(err) is None:
            raise
        _fail(_explain(err))


def add_sensitivity_parser(sub) -> None:
    """``sparselite sensitivity``."""
    p = sub.add_parser("sensitivity", help="prune each layer alone over a grid; write a recipe of per-layer targets")
    p.add_argument("-c", "--config", action="append", required=True, help="the run's configs: model+data, and a recipe with GradualPruning")
    p.add_argument("--target", type=float, default=None, help="overall sparsity to reach (default: the recipe's final_sparsity)")
    p.add_argument("--grid", default=",".join(f"{s:g}" for s in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)), help="sparsities to measure, comma-separated")
    p.add_argument("--checkpoint", default=None, help="a dense checkpoint of this config to measure (default: train one first)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="dense training steps without --checkpoint (default: trainer.max_steps)")
    p.add_argument("--fine-tune-steps", type=int, default=0, help="training steps after pruning each point (0: none)")
    p.add_argument("--fine-tune-lr", type=float, default=1e-4)
    p.add_argument("--val-batches", type=int, default=0, help="validation batches per point (0: all)")
    p.add_argument("-o", "--out", default="runs/sensitivity", help="folder for the table, plot, measured points and recipe")
    p.add_argument("--recipe", default=None, help="where the recipe goes (default: OUT/recipe.yaml)")
    p.set_defaults(func=sensitivity_command)
