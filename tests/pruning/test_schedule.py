"""PolynomialDecay: the Zhu & Gupta cubic, its update beats, and argument validation."""

from __future__ import annotations

import pytest

from sparselite.errors import SparseliteError
from sparselite.pruning.schedule import PolynomialDecay


def cubic(step: int, s_i: float, s_f: float, t0: int, t1: int) -> float:
    progress = min(1.0, max(0.0, (step - t0) / (t1 - t0)))
    return s_f + (s_i - s_f) * (1 - progress) ** 3


@pytest.mark.parametrize("initial", [0.0, 0.2])
def test_cubic_values_at_begin_mid_end(initial):
    schedule = PolynomialDecay(initial_sparsity=initial, final_sparsity=0.8, begin_step=100, end_step=500, frequency=50)
    assert schedule.sparsity_at(0) == 0.0
    assert schedule.sparsity_at(99) == 0.0
    assert schedule.sparsity_at(100) == pytest.approx(initial)
    assert schedule.sparsity_at(300) == pytest.approx(0.8 + (initial - 0.8) * 0.5**3)
    assert schedule.sparsity_at(200) == pytest.approx(cubic(200, initial, 0.8, 100, 500))
    assert schedule.sparsity_at(500) == pytest.approx(0.8)
    assert schedule.sparsity_at(10_000) == pytest.approx(0.8)


def test_power_changes_the_curve():
    linear = PolynomialDecay(final_sparsity=0.8, begin_step=0, end_step=100, power=1.0)
    assert linear.sparsity_at(50) == pytest.approx(0.4)
    assert PolynomialDecay(final_sparsity=0.8, begin_step=0, end_step=100).sparsity_at(50) == pytest.approx(0.7)


def test_sparsity_never_decreases():
    schedule = PolynomialDecay(initial_sparsity=0.1, final_sparsity=0.9, begin_step=10, end_step=90, frequency=7)
    values = [schedule.sparsity_at(step) for step in range(0, 120)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_updates_on_frequency_beats_inside_the_window():
    schedule = PolynomialDecay(final_sparsity=0.8, begin_step=100, end_step=500, frequency=50)
    updates = [step for step in range(0, 700) if schedule(step)[0]]
    assert updates == list(range(100, 501, 50))
    assert schedule(150) == (True, pytest.approx(schedule.sparsity_at(150)))
    assert schedule(149)[0] is False
    assert schedule(99)[0] is False
    assert schedule(550)[0] is False


def test_end_step_always_updates_even_off_beat():
    schedule = PolynomialDecay(final_sparsity=0.5, begin_step=0, end_step=130, frequency=50)
    updates = [step for step in range(0, 200) if schedule(step)[0]]
    assert updates == [0, 50, 100, 130]
    assert schedule(130)[1] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(final_sparsity=1.0), "final_sparsity=1.0 is outside [0, 1)"),
        (dict(final_sparsity=1.5), "final_sparsity"),
        (dict(final_sparsity=-0.1), "final_sparsity"),
        (dict(initial_sparsity=-0.2), "initial_sparsity"),
        (dict(initial_sparsity=0.9, final_sparsity=0.5), "above final_sparsity"),
        (dict(begin_step=500, end_step=500), "must be below end_step"),
        (dict(begin_step=600, end_step=500), "must be below end_step"),
        (dict(begin_step=-1), "begin_step=-1"),
        (dict(frequency=0), "frequency=0"),
        (dict(power=0.0), "power"),
        # YAML gives null, .nan, .inf and strings as readily as numbers.
        (dict(final_sparsity=None), "final_sparsity=None must be a finite number"),
        (dict(power=float("nan")), "power=nan must be a finite number"),
        (dict(end_step=float("inf")), "end_step=inf must be a finite number"),
        (dict(frequency="abc"), "frequency='abc' must be a finite number"),
        (dict(frequency=2.5), "frequency=2.5 must be a whole number"),
    ],
)
def test_invalid_arguments_raise_sparselite_error(kwargs, message):
    with pytest.raises(SparseliteError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        PolynomialDecay(**kwargs)


def test_sparselite_error_is_a_value_error():
    with pytest.raises(ValueError):
        PolynomialDecay(final_sparsity=2.0)
