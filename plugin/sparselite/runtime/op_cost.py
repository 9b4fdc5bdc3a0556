"""What a subset of a file's ops costs on XNNPACK: each subset is cut out into a file of its own and
timed alone, interleaved with the whole file, and reported as a share of the whole file's latency.

LiteRT's Python interpreter has no per-op profiler, so this is how the export report says what each
float island costs. It is an estimate, and it errs both ways:
- ops timed alone skip the hand-over between the delegate and TFLite's kernels that a mixed file
  pays at every island border (too low for ops XNNPACK does not take);
- an op that XNNPACK fuses into its neighbour costs more alone than in the file: mobilenet_v3_small's
  five int8 PADs take 73% of the file's latency alone, and nothing next to the convolutions they are
  fused into (PADs + convolutions cut out together: 13%, the convolutions alone: 13%). Float islands
  sit between a DEQUANTIZE and a QUANTIZE, which XNNPACK fuses with neither, so their own ops are timed
  as they run; subtracting neighbours instead was tried and fails the other way (the neighbours,
  timed without their fusion partners, cost more than the ops did).
Inputs are random values of the right shape and type.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from sparselite.runtime.bench import interleaved_seconds
from sparselite.tflite.flatbuffer import write_model


def ops_alone(model: schema.ModelT, keep: Iterable[int]) -> bytes:
    """A file that runs only operators ``keep`` of the first subgraph: what they read from the rest of
    the graph becomes an input, what the rest read from them (or the graph returned) an output."""
    keep = set(keep)
    cut = copy.deepcopy(model)
    graph = cut.subgraphs[0]
    kept = [op for i, op in enumerate(graph.operators) if i in keep]
    produced = {t for op in kept for t in op.outputs if t >= 0}
    read = {t for op in kept for t in op.inputs if t >= 0}
    read_elsewhere = {t for i, op in enumerate(graph.operators) if i not in keep for t in op.inputs if t >= 0}

    def constant(t: int) -> bool:
        return cut.buffers[graph.tensors[t].buffer].data is not None

    graph.inputs = sorted(t for t in read - produced if not constant(t))
    graph.outputs = sorted(t for t in produced if t not in read or t in read_elsewhere or t in set(model.subgraphs[0].outputs))
    graph.operators = kept
    cut.signatureDefs = []  # they name the whole graph's inputs and outputs
    return write_model(cut)


def _interpreter(content: bytes, threads: int):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content, num_threads=threads)
    interpreter.allocate_tensors()
    rng = np.random.default_rng(0)
    for detail in interpreter.get_input_details():
        dtype, shape = detail["dtype"], detail["shape"]
        if np.issubdtype(dtype, np.floating):
            value = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.int8:
            value = rng.integers(-128, 128, shape).astype(np.int8)
        else:  # indices and sizes: zeros are in range for any of them
            value = np.zeros(shape, dtype)
        interpreter.set_tensor(detail["index"], value)
    return interpreter


def median_latencies(files: dict[str, bytes], threads: int = 1, warmup: int = 3, rounds: int = 5,
                     runs_per_round: int = 20) -> dict[str, float]:
    """Median XNNPACK latency (seconds) of each file, any number of inputs, timed in interleaved rounds."""
    runners = {name: _interpreter(content, threads).invoke for name, content in files.items()}
    return {name: float(np.median(times)) for name, times in interleaved_seconds(runners, warmup, rounds, runs_per_round).items()}


def latency_shares(model: schema.ModelT, whole: bytes, subsets: dict[str, list[int]], threads: int = 1,
                   rounds: int = 5, runs_per_round: int = 20) -> dict[str, float]:
    """Each subset's median XNNPACK latency, timed alone, over the whole file's, in interleaved rounds."""
    files = {"": whole} | {name: ops_alone(model, ops) for name, ops in subsets.items() if ops}
    medians = median_latencies(files, threads, rounds=rounds, runs_per_round=runs_per_round)
    whole_s = medians.pop("")
    return {name: seconds / whole_s for name, seconds in medians.items()}
