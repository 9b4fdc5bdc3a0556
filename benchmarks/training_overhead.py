"""Training-step overhead of gradual pruning + QAT fake-quant on MobileNetLite (Fashion-MNIST, batch 128).

What it measures: the wall time of one optimizer step (forward, backward, AdamW, one-cycle LR) of the
default ``MobileNetLite`` on real Fashion-MNIST batches, in two configurations trained side by side:
  - plain:       the float model, nothing else;
  - compressed:  the same model with ``MagnitudePruner`` (``pruner.step`` every step, a mask update every
                 ``--prune-frequency`` steps, ``apply_masks`` after every optimizer step) and
                 ``QuantizationSimulator`` active from step 0 (weight + activation fake-quant, ranges observing).
Steps are interleaved one by one (plain, compressed, compressed, plain, ...), so load from other users of
the machine hits both alike. The headline is the median over turns of (compressed step / plain step
of the same turn), target <= 1.3x; the ratio of medians, of minimums and of means are printed too
(means include the steps that recompute masks).

With ``--lightning`` it also times the Lightning callbacks: a ``Trainer`` fitting ``ImageClassifier``
with ``GradualPruning`` + ``QuantizationAwareTraining`` vs one without, same steps, interleaved fits;
the step time is the interval between consecutive ``on_train_batch_start`` calls.

Run (from the repo root):
    .venv/bin/python -m benchmarks.training_overhead                      # ~1.5 min on 2 busy cores
    .venv/bin/python -m benchmarks.training_overhead --rounds 8 --steps-per-round 8 --lightning --json out.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import _common as C
from sparselite.models.mobilenet import MobileNetLite
from sparselite.pruning.pruner import MagnitudePruner
from sparselite.pruning.schedule import PolynomialDecay
from sparselite.quantization.qat import QuantizationSimulator

TARGET_RATIO = 1.3


class Stepper:
    """One model + optimizer + batch stream, stepping one optimizer step at a time."""

    def __init__(self, model, data: C.Data, batch_size: int, total_steps: int, pruner=None, simulator=None) -> None:
        self.model, self.pruner, self.simulator = model.train(), pruner, simulator
        self.stream = C.BatchStream(data.train_x, data.train_y, batch_size, seed=0)
        self.optimizer, self.scheduler = C.make_optimizer(model, total_steps)
        self.step_index, self.times_ms, self.mask_updates = 0, [], 0

    def step(self, record: bool = True) -> None:
        x, y = self.stream.next()  # batch indexing is outside the timed region, for both
        t0 = time.perf_counter()
        if self.simulator is not None:
            self.simulator.step(self.step_index)
        if self.pruner is not None and self.pruner.step(self.step_index):
            self.mask_updates += record
        loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if self.pruner is not None:
            self.pruner.apply_masks()
        elapsed = (time.perf_counter() - t0) * 1e3
        if record:
            self.times_ms.append(elapsed)
        self.step_index += 1


def core_benchmark(data: C.Data, args) -> dict:
    total = args.warmup + args.rounds * args.steps_per_round
    torch.manual_seed(0)
    base = MobileNetLite()

    def configured(prune: bool, qat: bool) -> Stepper:
        model = copy.deepcopy(base)
        pruner = simulator = None
        if prune:
            schedule = PolynomialDecay(final_sparsity=0.8, begin_step=0, end_step=max(total, 2), frequency=args.prune_frequency)
            pruner = MagnitudePruner(schedule, pattern=args.pattern)
            pruner.prepare(model)
        if qat:
            simulator = QuantizationSimulator(begin_step=0)
            simulator.prepare(model)
        return Stepper(model, data, args.batch_size, total, pruner, simulator)

    steppers = {"plain": configured(False, False), "compressed": configured(True, True)}
    if args.breakdown:
        steppers["pruning only"] = configured(True, False)
        steppers["QAT only"] = configured(False, True)
    pruner, simulator = steppers["compressed"].pruner, steppers["compressed"].simulator
    layers, chains = pruner.layers, simulator.chains
    for _ in range(args.warmup):
        for stepper in steppers.values():
            stepper.step(record=False)
    # Step-level interleaving: every configuration takes one step in turn (order reversed every other
    # turn), so load spikes from other users of the machine hit all of them; the ratio of each turn's
    # pair of steps is the least noisy statistic.
    round_ratios, pair_ratios = [], []
    names = list(steppers)
    for r in range(args.rounds):
        start = {name: len(s.times_ms) for name, s in steppers.items()}
        for i in range(args.steps_per_round):
            for name in (names if (r * args.steps_per_round + i) % 2 == 0 else names[::-1]):
                steppers[name].step()
            pair_ratios.append(steppers["compressed"].times_ms[-1] / steppers["plain"].times_ms[-1])
        medians = {name: C.median(s.times_ms[start[name]:]) for name, s in steppers.items()}
        round_ratios.append(medians["compressed"] / medians["plain"])
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {m:.0f} ms" for n, m in medians.items())
              + f", ratio {round_ratios[-1]:.3f}", file=sys.stderr, flush=True)
    result = {
        name: {"median_ms": C.median(s.times_ms), "mean_ms": statistics.fmean(s.times_ms),
               "min_ms": min(s.times_ms), "steps_timed": len(s.times_ms), "mask_updates_timed": s.mask_updates}
        for name, s in steppers.items()
    }
    for name in steppers:
        result[name]["ratio_to_plain"] = result[name]["median_ms"] / result["plain"]["median_ms"]
    result["configs"] = list(steppers)
    result["ratio_of_medians"] = result["compressed"]["median_ms"] / result["plain"]["median_ms"]
    result["ratio_of_means"] = result["compressed"]["mean_ms"] / result["plain"]["mean_ms"]
    result["median_of_round_ratios"] = C.median(round_ratios)
    result["median_of_step_pair_ratios"] = C.median(pair_ratios)
    result["ratio_of_mins"] = result["compressed"]["min_ms"] / result["plain"]["min_ms"]
    result["round_ratios"] = round_ratios
    result["pruned_layers"], result["qat_layers"] = list(layers), len(chains)
    result["sparsity_at_end"] = pruner.sparsity()["overall"]
    return result


def lightning_benchmark(data: C.Data, args) -> dict:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from sparselite import GradualPruning, QuantizationAwareTraining
    from sparselite.models.classifier import ImageClassifier

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_batch_start(self, *_args) -> None:
            self.starts.append(time.perf_counter())

        def on_train_end(self, *_args) -> None:
            self.starts.append(time.perf_counter())  # closes the last step

    steps = args.lightning_warmup + args.lightning_steps
    loader = DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    samples: dict[str, list[float]] = {"without callbacks": [], "GradualPruning + QAT": []}
    for r in range(args.lightning_rounds):
        names = list(samples) if r % 2 == 0 else list(samples)[::-1]
        for name in names:
            torch.manual_seed(0)
            timer = StepTimer()
            callbacks = [timer]
            if name != "without callbacks":
                callbacks += [GradualPruning(final_sparsity=0.8, begin_step=0, end_step=1000, frequency=args.prune_frequency,
                                             pattern=args.pattern),
                              QuantizationAwareTraining(begin_step=0)]
            trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, callbacks=callbacks, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                 limit_val_batches=0, num_sanity_val_steps=0)
            trainer.fit(ImageClassifier(MobileNetLite(), lr=5e-3), train_dataloaders=loader)
            intervals = [(b - a) * 1e3 for a, b in zip(timer.starts, timer.starts[1:])]
            samples[name].extend(intervals[args.lightning_warmup:])
            print(f"  lightning round {r + 1}/{args.lightning_rounds} {name}: median {C.median(intervals[args.lightning_warmup:]):.0f} ms",
                  file=sys.stderr, flush=True)
    result = {name: {"median_ms": C.median(v), "mean_ms": statistics.fmean(v), "steps_timed": len(v)} for name, v in samples.items()}
    result["ratio_of_medians"] = result["GradualPruning + QAT"]["median_ms"] / result["without callbacks"]["median_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration before round 1")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--prune-frequency", type=int, default=10,
                        help="steps between mask updates (recipes use 50; smaller = more mask-update cost in the timed steps)")
    parser.add_argument("--breakdown", action="store_true", help="also time pruning-only and QAT-only models (2x the time)")
    parser.add_argument("--lightning", action="store_true", help="also time the Lightning callbacks (adds ~1-2 min)")
    parser.add_argument("--lightning-rounds", type=int, default=2)
    parser.add_argument("--lightning-steps", type=int, default=8, help="timed steps per fit")
    parser.add_argument("--lightning-warmup", type=int, default=2, help="untimed first steps of each fit")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    C.quiet_logs()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = C.environment()
    data = C.load_data()

    core = core_benchmark(data, args)
    print()
    print(C.environment_line(env))
    print(f"Training step time, MobileNetLite (default config), batch {args.batch_size}, real Fashion-MNIST; "
          f"{args.rounds} rounds x {args.steps_per_round} step-interleaved turns per configuration")
    print(f"compressed = MagnitudePruner ({args.pattern}, {len(core['pruned_layers'])} layers, pruner.step every step, "
          f"mask update every {args.prune_frequency}) + apply_masks + QuantizationSimulator active ({core['qat_layers']} layers, observing)\n")
    rows = [[name, f"{core[name]['median_ms']:.1f}", f"{core[name]['ratio_to_plain']:.3f}x", f"{core[name]['mean_ms']:.1f}",
             f"{core[name]['min_ms']:.1f}", core[name]["steps_timed"], core[name]["mask_updates_timed"]] for name in core["configs"]]
    print(C.table(["config", "median ms", "vs plain", "mean ms", "min ms", "steps", "mask updates"], rows))
    verdict = "meets" if core["median_of_step_pair_ratios"] <= TARGET_RATIO else "MISSES"
    print(f"\nratio compressed/plain: {core['median_of_step_pair_ratios']:.3f}x median of per-step-pair ratios "
          f"({verdict} target <= {TARGET_RATIO}x); {core['ratio_of_medians']:.3f}x of medians, "
          f"{core['ratio_of_mins']:.3f}x of minimums, {core['ratio_of_means']:.3f}x of means (means include mask updates)")
    payload = {"environment": env, "args": vars(args), "core": core, "target_ratio": TARGET_RATIO}

    if args.lightning:
        lit = lightning_benchmark(data, args)
        print(f"\nLightning: Trainer.fit(ImageClassifier(MobileNetLite)) with vs without GradualPruning + "
              f"QuantizationAwareTraining(begin_step=0); {args.lightning_rounds} interleaved fits x {args.lightning_steps} timed steps each\n")
        rows = [[name, f"{lit[name]['median_ms']:.1f}", f"{lit[name]['mean_ms']:.1f}", lit[name]["steps_timed"]]
                for name in ("without callbacks", "GradualPruning + QAT")]
        print(C.table(["trainer", "median ms", "mean ms", "steps"], rows))
        verdict = "meets" if lit["ratio_of_medians"] <= TARGET_RATIO else "MISSES"
        print(f"\nratio with/without callbacks: {lit['ratio_of_medians']:.3f}x of medians ({verdict} target <= {TARGET_RATIO}x)")
        payload["lightning"] = lit
    C.write_json(args.json, payload)


if __name__ == "__main__":
    main()
