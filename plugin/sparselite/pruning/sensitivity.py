"""Pruning sensitivity without Lightning: prune one layer at a time over a grid of sparsities, measure the
validation loss and accuracy of each point, and give each layer the sparsity that reaches an overall
target with the least predicted loss.

The prediction is additive: pruning several layers costs the sum of what each cost alone (the usual
assumption of sensitivity analysis; it is what ``GradualPruning``'s per-layer ``overrides`` then train to).
``allocate`` solves that problem on each layer's measured curve, made monotone and then convex (its lower
hull): pruned weights are bought in order of least loss per weight, across layers, which is the optimum of
the convexified problem (the Lagrangian solution; the last segment is taken in part, so the target is met
exactly). Curves are weighted by parameter count, so the overall sparsity is that of ``MagnitudePruner``:
zeros over all weights of the pruned layers.
"""

from __future__ import annotations

import copy
import math
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparselite.errors import SparseliteError
from sparselite.pruning.masks import Pattern, layer_mask

DEFAULT_GRID = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


@dataclass
class Point:
    sparsity: float
    loss: float
    accuracy: float


@dataclass
class LayerCurve:
    """One layer's measured sensitivity: validation loss and accuracy with only this layer pruned."""

    layer: str
    params: int
    points: list[Point] = field(default_factory=list)  # sparsity 0 is the unpruned model

    def loss_at(self, sparsity: float) -> float:
        return next(p.loss for p in self.points if abs(p.sparsity - sparsity) < 1e-9)


@dataclass
class Allocation:
    targets: dict[str, float]  # layer -> final sparsity
    overall: float  # sparsity over all the layers' weights, weighted by parameter count
    predicted_loss_increase: float  # sum over layers of each one's (convexified) loss increase alone

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_grid(text: str | Sequence[float]) -> tuple[float, ...]:
    """'0.5,0.7,0.9' -> (0.5, 0.7, 0.9), checked: each in (0, 1), sorted, no repeats."""
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        raise SparseliteError(f"grid {text!r} must be sparsities separated by commas, such as 0.5,0.7,0.9") from None
    if not values or any(not math.isfinite(v) or not 0.0 < v < 1.0 for v in values):
        raise SparseliteError(f"grid {text!r}: every sparsity must be in (0, 1)")
    return tuple(sorted(set(values)))


# ---------------------------------------------------------------------------------------------- allocation


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower convex hull of points sorted by x (Andrew's monotone chain, lower half)."""
    hull: list[tuple[float, float]] = []
    for x, y in points:
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) <= 0:  # hull[-1] is on or above the chord
                hull.pop()
            else:
                break
        hull.append((x, y))
    return hull


def convex_cost(curve: LayerCurve) -> list[tuple[float, float]]:
    """(sparsity, loss increase) of the curve made monotone (pruning more never predicts less loss) and
    convex (its lower hull), starting at (0, 0)."""
    points = sorted((p.sparsity, p.loss) for p in curve.points)
    if not points or points[0][0] != 0.0:
        raise SparseliteError(f"layer {curve.layer}: the curve needs the unpruned point (sparsity 0)")
    base, running, monotone = points[0][1], 0.0, []
    for sparsity, loss in points:
        running = max(running, loss - base)
        monotone.append((sparsity, running))
    return _lower_hull(monotone)


def _interpolate(hull: list[tuple[float, float]], sparsity: float) -> float:
    for (x0, y0), (x1, y1) in zip(hull, hull[1:]):
        if x0 <= sparsity <= x1:
            return y0 + (y1 - y0) * (sparsity - x0) / (x1 - x0) if x1 > x0 else y1
    return hull[-1][1]


def allocate(curves: Sequence[LayerCurve], target: float, decimals: int = 4) -> Allocation:
    """Per-layer sparsities whose parameter-weighted mean is at least ``target``, with the least predicted
    loss increase (see the module docstring). Targets are rounded up to ``decimals`` places."""
    if not curves:
        raise SparseliteError("no layer curves to allocate sparsity over")
    if not 0.0 <= target < 1.0:
        raise SparseliteError(f"target sparsity {target} must be in [0, 1)")
    total = sum(c.params for c in curves)
    needed = target * total
    hulls = {c.layer: convex_cost(c) for c in curves}
    segments = []
    for order, curve in enumerate(curves):
        hull = hulls[curve.layer]
        for (s0, y0), (s1, y1) in zip(hull, hull[1:]):
            gain = (s1 - s0) * curve.params
            segments.append(((y1 - y0) / gain, order, s0, curve, s1))
    segments.sort(key=lambda seg: seg[:3])  # convex: one layer's segments come in order of slope
    chosen = {c.layer: 0.0 for c in curves}
    pruned = 0.0
    for _, _, s0, curve, s1 in segments:
        if pruned >= needed - 1e-9:
            break
        gain = (s1 - s0) * curve.params
        if pruned + gain >= needed:
            chosen[curve.layer] = s0 + (s1 - s0) * (needed - pruned) / gain
            pruned = needed
            break
        chosen[curve.layer], pruned = s1, pruned + gain
    if pruned < needed - 1e-6 * total:
        reachable = sum(max(p.sparsity for p in c.points) * c.params for c in curves) / total
        raise SparseliteError(f"an overall sparsity of {target:.0%} cannot be reached: pruning every layer to the grid's "
                              f"highest sparsity gives {reachable:.1%}; add a higher sparsity to the grid")
    scale = 10 ** decimals
    targets = {layer: min(math.ceil(s * scale - 1e-6) / scale, max(p.sparsity for p in c.points))
               for c in curves for layer, s in [(c.layer, chosen[c.layer])]}
    overall = sum(targets[c.layer] * c.params for c in curves) / total
    predicted = sum(_interpolate(hulls[c.layer], targets[c.layer]) for c in curves)
    return Allocation(targets, overall, predicted)


def uniform_loss_increase(curves: Sequence[LayerCurve], sparsity: float) -> float | None:
    """Predicted loss increase of pruning every layer to ``sparsity`` (None if off the grid's range)."""
    if any(max(p.sparsity for p in c.points) < sparsity for c in curves):
        return None
    return sum(_interpolate(convex_cost(c), sparsity) for c in curves)


# ---------------------------------------------------------------------------------------------- measuring


class SweepInterrupted(BaseException):
    """The sweep stopped on SIGINT/SIGTERM; the points measured so far were kept. A BaseException, so that
    no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal:
    """While active, SIGINT and SIGTERM raise ``SweepInterrupted`` where the program is (Python code only),
    so the sweep stops between two tensor operations; the previous handlers come back on exit."""

    def __enter__(self) -> StopOnSignal:
        self._previous = {}
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._raise)
        except ValueError:  # not the main thread
            pass
        return self

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise SweepInterrupted(signum)

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _logits(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: Iterable) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) of ``model`` in eval mode over ``(inputs, labels)`` batches."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for batch in batches:
        inputs, labels = batch[0], batch[1]
        logits = _logits(model(inputs))
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
        count += len(labels)
    model.train(was_training)
    if count == 0:
        raise SparseliteError("the validation data gave no examples to measure sensitivity on")
    return loss_sum / count, correct / count


def point_key(layer: str, sparsity: float) -> str:
    return f"{layer}@{sparsity:.6f}"


def _weight_of(layer: nn.Module | torch.Tensor) -> torch.Tensor:
    return layer if isinstance(layer, torch.Tensor) else layer.weight


def measure_sensitivity(
    model: nn.Module,
    layers: Mapping[str, nn.Module | torch.Tensor],
    patterns: Mapping[str, Pattern],
    grid: Sequence[float],
    evaluate: Callable[[nn.Module], tuple[float, float]],
    fine_tune: Callable[[nn.Module, nn.Module | torch.Tensor, torch.Tensor], None] | None = None,
    known: Mapping[str, Point] | None = None,
    on_point: Callable[[int, int, str, Point, bool], None] | None = None,
) -> list[LayerCurve]:
    """Each layer alone, pruned by magnitude (its ``patterns`` entry) to each sparsity of ``grid``, then
    ``fine_tune(model, layer, mask)`` if given (it must keep the mask applied), then ``evaluate(model)``
    -> (loss, accuracy). A layer is a module (its ``weight`` is pruned) or the weight itself (a recurrent
    layer's ``weight_hh_l0``); ``fine_tune`` gets it as given. The model is put back exactly after each point. ``known``: points measured before
    (``point_key`` -> Point), not measured again. ``on_point(done, total, layer, point, reused)`` after each."""
    known = dict(known or {})
    base_key = point_key("", 0.0)
    total = len(layers) * len(grid) + 1
    done = 0
    if base_key in known:
        base = known[base_key]
    else:
        base = Point(0.0, *evaluate(model))
    done += 1
    if on_point:
        on_point(done, total, "(unpruned)", base, base_key in known)
    known[base_key] = base
    curves = []
    state = copy.deepcopy(model.state_dict()) if fine_tune is not None else None
    for name, layer in layers.items():
        weight = _weight_of(layer)
        curve = LayerCurve(name, weight.numel(), [base])
        for sparsity in grid:
            key = point_key(name, sparsity)
            reused = key in known
            if not reused:
                original = weight.detach().clone()
                try:
                    mask = layer_mask(weight.detach(), sparsity, patterns[name]).to(weight.dtype)
                    with torch.no_grad():
                        weight.mul_(mask)
                    if fine_tune is not None:
                        fine_tune(model, layer, mask)
                    known[key] = Point(sparsity, *evaluate(model))
                finally:
                    if state is not None:
                        model.load_state_dict(state)
                    with torch.no_grad():
                        weight.copy_(original)
            curve.points.append(known[key])
            done += 1
            if on_point:
                on_point(done, total, name, known[key], reused)
        curves.append(curve)
    return curves


# ---------------------------------------------------------------------------------------------- outputs


def table_rows(curves: Sequence[LayerCurve], allocation: Allocation | None) -> list[dict[str, Any]]:
    rows = []
    for curve in curves:
        for point in curve.points:
            rows.append({"layer": curve.layer, "params": curve.params, "sparsity": point.sparsity, "val_loss": point.loss,
                         "val_acc": point.accuracy,
                         "allocated": None if allocation is None else allocation.targets.get(curve.layer)})
    return rows


def format_table(curves: Sequence[LayerCurve], allocation: Allocation | None) -> str:
    """Validation accuracy per layer and sparsity, the allocated target last."""
    grid = sorted({p.sparsity for c in curves for p in c.points})
    header = ["layer", "params", *[f"{s:.0%}" for s in grid], "target"]
    rows = [header]
    for curve in curves:
        accuracy = {p.sparsity: p.accuracy for p in curve.points}
        target = "" if allocation is None else f"{allocation.targets[curve.layer]:.1%}"
        rows.append([curve.layer, f"{curve.params:,}", *[f"{100 * accuracy[s]:.1f}" if s in accuracy else "-" for s in grid], target])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_curves(curves: Sequence[LayerCurve], allocation: Allocation | None, path: str) -> None:
    """Validation loss and accuracy against sparsity, one line per layer, the allocated targets marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for curve in curves:
        points = sorted(curve.points, key=lambda p: p.sparsity)
        xs = [100 * p.sparsity for p in points]
        line, = loss_ax.plot(xs, [p.loss for p in points], marker="o", ms=3, lw=1, label=f"{curve.layer} ({curve.params:,})")
        acc_ax.plot(xs, [100 * p.accuracy for p in points], marker="o", ms=3, lw=1, color=line.get_color())
        if allocation is not None:
            s = allocation.targets[curve.layer]
            hull = convex_cost(curve)
            loss_ax.plot([100 * s], [points[0].loss + _interpolate(hull, s)], marker="*", ms=11, color=line.get_color(),
                         markeredgecolor="black", markeredgewidth=0.5)
    loss_ax.set_xlabel("sparsity of this layer alone, %")
    loss_ax.set_ylabel("validation loss")
    acc_ax.set_xlabel("sparsity of this layer alone, %")
    acc_ax.set_ylabel("validation top-1, %")
    title = "Pruning sensitivity (one layer at a time)"
    if allocation is not None:
        title += f"; stars: allocated targets, {allocation.overall:.1%} overall"
    fig.suptitle(title, fontsize=10)
    loss_ax.legend(fontsize=7)
    fig.savefig(path)
