"""Sensitivity allocation on synthetic curves, and the sweep on a tiny model: the per-layer targets reach the
requested overall sparsity with the least predicted loss, and the model comes back untouched."""

from __future__ import annotations

import itertools
import signal

import pytest
import torch
from torch import nn

from sparselite.errors import SparseliteError
from sparselite.pruning.masks import Pattern
from sparselite.pruning.sensitivity import (LayerCurve, Point, StopOnSignal, SweepInterrupted, allocate, convex_cost,
                                            evaluate_classifier, format_table, measure_sensitivity, parse_grid, plot_curves,
                                            uniform_loss_increase)

GRID = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)


def curve(name: str, params: int, cost) -> LayerCurve:
    """A layer whose loss rises by ``cost(s)`` above a base loss of 1.0."""
    return LayerCurve(name, params, [Point(s, 1.0 + cost(s), 0.9 - cost(s) / 10) for s in GRID])


def overall(allocation, curves) -> float:
    return sum(allocation.targets[c.layer] * c.params for c in curves) / sum(c.params for c in curves)


def test_robust_layers_are_pruned_harder_and_the_target_is_met():
    curves = [curve("robust", 1000, lambda s: 0.01 * s), curve("fragile", 1000, lambda s: 2.0 * s ** 4)]
    allocation = allocate(curves, 0.8)
    assert allocation.targets["robust"] == 0.95 and allocation.targets["fragile"] < 0.7
    assert overall(allocation, curves) == pytest.approx(0.8, abs=1e-4) and allocation.overall >= 0.8
    assert allocation.predicted_loss_increase < uniform_loss_increase(curves, 0.8)


def test_parameter_count_weights_the_overall_sparsity():
    # Same cost curve: the big layer buys more sparsity per unit of loss (loss per weight is lower).
    curves = [curve("big", 9000, lambda s: s ** 2), curve("small", 1000, lambda s: s ** 2)]
    allocation = allocate(curves, 0.5)
    assert allocation.targets["big"] > allocation.targets["small"]
    assert overall(allocation, curves) == pytest.approx(0.5, abs=1e-4)


def test_allocation_is_optimal_on_the_grid():
    """Against every combination of grid points that reaches the target: no cheaper one exists."""
    costs = [lambda s: 0.2 * s, lambda s: 3 * max(s - 0.7, 0) ** 2 + 0.05 * s, lambda s: s ** 3, lambda s: 0.5 * s ** 2]
    curves = [curve(f"l{i}", p, c) for i, (p, c) in enumerate(zip((400, 1200, 800, 2000), costs))]
    total = sum(c.params for c in curves)
    for target in (0.5, 0.7, 0.8, 0.9):
        allocation = allocate(curves, target)
        best = min(sum(c.loss_at(s) - 1.0 for c, s in zip(curves, combo))
                   for combo in itertools.product(GRID, repeat=len(curves))
                   if sum(s * c.params for c, s in zip(curves, combo)) >= target * total - 1e-9)
        assert overall(allocation, curves) >= target - 1e-4
        assert allocation.predicted_loss_increase <= best + 1e-6, target


def test_noisy_curves_are_made_monotone_and_convex():
    noisy = LayerCurve("noisy", 100, [Point(0.0, 1.0, 0.9), Point(0.5, 0.95, 0.91), Point(0.7, 1.3, 0.8),
                                      Point(0.8, 1.2, 0.8), Point(0.9, 2.0, 0.5), Point(0.95, 1.9, 0.5)])
    hull = convex_cost(noisy)
    ys = [y for _, y in hull]
    assert hull[0] == (0.0, 0.0) and ys == sorted(ys)  # never predicts a gain from pruning
    slopes = [(y1 - y0) / (x1 - x0) for (x0, y0), (x1, y1) in zip(hull, hull[1:])]
    assert slopes == sorted(slopes)


def test_unreachable_targets_and_bad_grids_are_one_line_errors():
    curves = [curve("a", 100, lambda s: s), curve("b", 100, lambda s: s)]
    with pytest.raises(SparseliteError, match="cannot be reached"):
        allocate([LayerCurve("a", 100, [Point(0.0, 1, 1), Point(0.5, 2, 1)])], 0.8)
    assert allocate(curves, 0.0).targets == {"a": 0.0, "b": 0.0}
    for bad in ("0.5,abc", "0.5,1.0", "", "-0.1"):
        with pytest.raises(SparseliteError):
            parse_grid(bad)
    assert parse_grid("0.9,0.5,0.5") == (0.5, 0.9)


def test_sweep_measures_each_layer_alone_and_restores_the_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    inputs, labels = torch.randn(64, 1, 4, 4), torch.randint(0, 4, (64,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = {"1": model[1], "3": model[3]}
    seen = []
    curves = measure_sensitivity(model, layers, {n: Pattern.parse("unstructured") for n in layers}, (0.5, 0.9),
                                 lambda m: evaluate_classifier(m, [(inputs, labels)]),
                                 on_point=lambda done, total, layer, point, reused: seen.append((done, total, layer)))
    assert [c.layer for c in curves] == ["1", "3"] and seen[-1][:2] == (5, 5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert curves[0].points[0] is curves[1].points[0]  # one unpruned point, shared
    # Points measured before are reused, not measured again (a rerun after an interrupt).
    known = {f"{c.layer}@{p.sparsity:.6f}": p for c in curves for p in c.points[1:]} | {"@0.000000": curves[0].points[0]}
    calls = []
    again = measure_sensitivity(model, layers, {n: Pattern.parse("unstructured") for n in layers}, (0.5, 0.9),
                                lambda m: calls.append(1) or (0.0, 0.0), known=known)
    assert calls == [] and again[1].points[2] == curves[1].points[2]

    # A fine-tune sees the mask and keeps it; the model is still restored afterwards.
    def fine_tune(m, layer, mask):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01)
            layer.weight.mul_(mask)
    measure_sensitivity(model, layers, {n: Pattern.parse("unstructured") for n in layers}, (0.5,),
                        lambda m: evaluate_classifier(m, [(inputs, labels)]), fine_tune=fine_tune)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    allocation = allocate(curves, 0.7)
    assert "target" in format_table(curves, allocation)
    plot_curves(curves, allocation, str(tmp_path / "curves.svg"))
    assert (tmp_path / "curves.svg").stat().st_size > 1000


def test_a_signal_during_the_sweep_stops_it_with_the_shells_code():
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SweepInterrupted) as stopped, StopOnSignal():
        signal.raise_signal(signal.SIGTERM)
    assert stopped.value.exit_code == 143 and str(stopped.value) == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == previous


def test_sweep_takes_a_recurrent_gate_matrix_as_a_layer():
    torch.manual_seed(0)
    rnn, head = nn.GRU(8, 16, batch_first=True), nn.Linear(16, 4)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = rnn, head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    model = Model()
    inputs, labels = torch.randn(32, 5, 8), torch.randint(0, 4, (32,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = {"rnn.weight_hh_l0": rnn.weight_hh_l0, "head": head}  # a weight itself, or a module (its weight)
    seen = []

    def fine_tune(m, layer, mask):
        seen.append(float((layer == 0).float().mean()) if isinstance(layer, torch.Tensor) else None)

    curves = measure_sensitivity(model, layers, {n: Pattern.parse("unstructured") for n in layers}, (0.5,),
                                 lambda m: evaluate_classifier(m, [(inputs, labels)]), fine_tune=fine_tune)
    assert [(c.layer, c.params) for c in curves] == [("rnn.weight_hh_l0", 768), ("head", 64)]
    assert seen == [0.5, None]  # the gate matrix was pruned in place, where the GRU reads it
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
