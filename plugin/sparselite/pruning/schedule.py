"""When to prune and how much: the polynomial-decay schedule of Zhu & Gupta (2017)."""

from __future__ import annotations

import math

from dataclasses import dataclass

from sparselite.errors import SparseliteError


@dataclass(frozen=True)
class PolynomialDecay:
    """Sparsity rises from ``initial_sparsity`` to ``final_sparsity`` between ``begin_step`` and ``end_step``.

    s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power, updated every ``frequency`` steps.
    A cubic (power 3) prunes fast while the network is redundant and slowly near the end, which is what
    lets it recover accuracy.
    """

    initial_sparsity: float = 0.0
    final_sparsity: float = 0.8
    begin_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    power: float = 3.0

    def __post_init__(self) -> None:
        for name in ("initial_sparsity", "final_sparsity", "power", "begin_step", "end_step", "frequency"):
            value = getattr(self, name)
            # YAML hands over null, .nan, .inf and strings as readily as numbers; comparisons below
            # would let NaN through (every comparison is False) or raise TypeError on None.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SparseliteError(f"{name}={value!r} must be a finite number")
        for name in ("begin_step", "end_step", "frequency"):
            if not float(getattr(self, name)).is_integer():
                raise SparseliteError(f"{name}={getattr(self, name)} must be a whole number of steps")
        for name in ("initial_sparsity", "final_sparsity"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise SparseliteError(f"{name}={value} is outside [0, 1); use a fraction such as 0.8")
        if self.initial_sparsity > self.final_sparsity:
            raise SparseliteError(
                f"initial_sparsity={self.initial_sparsity} is above final_sparsity={self.final_sparsity}"
            )
        if self.begin_step < 0:
            raise SparseliteError(f"begin_step={self.begin_step} must be >= 0")
        if self.begin_step >= self.end_step:
            raise SparseliteError(
                f"begin_step={self.begin_step} must be below end_step={self.end_step}; "
                "pruning needs a window to ramp up in"
            )
        if self.frequency < 1:
            raise SparseliteError(f"frequency={self.frequency} must be >= 1 step")
        if self.power <= 0:
            raise SparseliteError(f"power={self.power} must be > 0 (3 is the Zhu & Gupta default)")

    def sparsity_at(self, step: int) -> float:
        if step < self.begin_step:
            return 0.0
        progress = min(1.0, (step - self.begin_step) / (self.end_step - self.begin_step))
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** self.power

    def __call__(self, step: int) -> tuple[bool, float]:
        """(whether masks update at this step, the target sparsity at this step)."""
        in_window = self.begin_step <= step <= self.end_step
        on_beat = (step - self.begin_step) % self.frequency == 0 or step == self.end_step
        return in_window and on_beat, self.sparsity_at(step)
