"""Latency of a LiteRT model: warm-up, then median and p90 over timed runs.

Numbers from one run on a shared machine are noisy; compare models timed in the same process, as
ratios, and quote medians.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from sparselite.runtime.litert import LiteRTModel


@dataclass
class Latency:
    accelerator: str
    threads: int
    runs: int
    median_ms: float
    p90_ms: float
    load_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


def _random_input(model: LiteRTModel) -> np.ndarray:
    """One batch in the model's own input dtype (latency does not depend on the values)."""
    rng = np.random.default_rng(0)
    if model.input_dtype == np.int8:
        return rng.integers(-128, 128, model.input_shape).astype(np.int8)
    return rng.standard_normal(model.input_shape).astype(np.float32)


def interleaved_seconds(runners: dict[str, Callable[[], object]], warmup: int, rounds: int,
                        runs_per_round: int) -> dict[str, list[float]]:
    """Call each runner ``warmup`` times, then in alternating rounds, so machine noise hits them alike;
    returns the seconds of every timed call."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(runs_per_round):
                t0 = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - t0)
    return samples


def interleaved_benchmark(paths: dict[str, str], accelerator: str = "xnnpack", threads: int = 1,
                          warmup: int = 20, rounds: int = 10, runs_per_round: int = 30) -> dict[str, Latency]:
    """Time several models in alternating rounds, so machine noise hits them alike (for ratios)."""
    models, load_ms = {}, {}
    for name, path in paths.items():
        start = time.perf_counter()
        models[name] = LiteRTModel(path, accelerator=accelerator, threads=threads)
        load_ms[name] = (time.perf_counter() - start) * 1e3
    runners = {name: functools.partial(model.run_raw, _random_input(model)) for name, model in models.items()}
    samples = interleaved_seconds(runners, warmup, rounds, runs_per_round)
    return {
        name: Latency(accelerator, threads, len(times), float(np.median(times) * 1e3),
                      float(np.percentile(times, 90) * 1e3), load_ms[name])
        for name, times in samples.items()
    }
