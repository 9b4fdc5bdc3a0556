"""``LiteRTModel``: run a .tflite on ai-edge-litert (XNNPACK, reference kernels, or the GPU accelerator)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from sparselite.errors import SparseliteError
from sparselite.runtime.backend import Backend, InterpreterBackend
from sparselite.runtime.load_probe import check_loads
from sparselite.tflite.flatbuffer import read_model

Accelerator = Literal["xnnpack", "reference", "gpu"]
ACCELERATORS = get_args(Accelerator)


class LiteRTModel:
    """A single-input, single-output TFLite model as a callable over numpy batches of any size.

    Args:
        path: the .tflite file.
        accelerator: 'xnnpack' (LiteRT's default CPU delegate), 'reference' (builtin kernels, no
            delegate: slow, but the semantics TFLite defines), or 'gpu' (LiteRT's GPU accelerator).
        threads: CPU threads for 'xnnpack' / 'reference'.
        gpu_precision / allow_cpu_fallback: passed to the GPU accelerator.

    Float inputs are quantized for an int8-input model, and int8 outputs are dequantized, so
    ``model(x)`` always takes and returns float32; ``run_raw`` skips both. ``backend`` is what runs
    one batch (``runtime.backend.Backend``).
    """

    def __init__(self, path: str | Path, accelerator: Accelerator = "xnnpack", threads: int = 1,
                 gpu_precision: Literal["fp16", "fp32"] = "fp16", allow_cpu_fallback: bool = False) -> None:
        if accelerator not in ACCELERATORS:
            raise SparseliteError(f"accelerator='{accelerator}' is not one of {', '.join(ACCELERATORS)}")
        if threads < 1:
            raise SparseliteError(f"threads={threads} must be >= 1")
        self.path = Path(path)
        if not self.path.is_file():
            raise SparseliteError(f"{self.path} does not exist; export a model first (sparselite export)")
        read_model(self.path)  # a corrupt file gets a clear error naming it here, not a crash in C++
        check_loads(self.path)  # what validation cannot foresee crashes a child process, not this one
        self.accelerator, self.threads = accelerator, threads
        self.backend: Backend
        if accelerator == "gpu":
            from sparselite.runtime.gpu import GpuBackend

            self.backend = GpuBackend(self.path, precision=gpu_precision, allow_cpu_fallback=allow_cpu_fallback)
        else:
            self.backend = InterpreterBackend(self.path, accelerator, threads)
        given, produced = self.backend.input, self.backend.output
        self.input_shape, self.input_dtype = given.shape, given.dtype
        self.output_shape, self.output_dtype = produced.shape, produced.dtype

    @property
    def input_quantization(self) -> tuple[float, int]:
        """(scale, zero_point) of the input; (0.0, 0) when it is not quantized."""
        return self.backend.input.scale or 0.0, self.backend.input.zero_point or 0

    @property
    def output_quantization(self) -> tuple[float, int]:
        return self.backend.output.scale or 0.0, self.backend.output.zero_point or 0

    @property
    def batch_size(self) -> int:
        return int(self.input_shape[0])

    def run_raw(self, x: np.ndarray) -> np.ndarray:
        """Run a batch in the model's own I/O dtypes; batches larger than the model's are looped."""
        if x.shape[1:] != self.input_shape[1:]:
            raise SparseliteError(f"input shape {x.shape} does not match the model's {self.input_shape}")
        step = self.batch_size
        invoke = self.backend.invoke
        if len(x) == step:
            return invoke(np.ascontiguousarray(x, dtype=self.input_dtype))
        if len(x) % step:
            raise SparseliteError(f"batch of {len(x)} is not a multiple of the model's batch size {step}")
        return np.concatenate([invoke(np.ascontiguousarray(x[i : i + step], dtype=self.input_dtype))
                               for i in range(0, len(x), step)])

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """Float input -> the model's int8 input (unchanged when the model takes floats or ``x`` is int8)."""
        x = np.asarray(x)
        if self.input_dtype == np.int8 and x.dtype != np.int8:
            scale, zero_point = self.input_quantization
            x = np.clip(np.round(x / scale) + zero_point, -128, 127).astype(np.int8)
        return x

    def dequantize_output(self, y: np.ndarray) -> np.ndarray:
        """The model's int8 output -> float32 (unchanged for a float output)."""
        if self.output_dtype == np.int8:
            scale, zero_point = self.output_quantization
            y = (y.astype(np.float32) - zero_point) * scale
        return y

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.dequantize_output(self.run_raw(self.quantize_input(x)))

    def evaluate(self, batches: Iterable) -> dict[str, float]:
        """Top-1 accuracy over an iterable of (inputs, labels) batches (torch tensors or numpy)."""
        correct = total = 0
        for inputs, labels in batches:
            logits = self(np.asarray(inputs))
            correct += int((logits.argmax(1) == np.asarray(labels)).sum())
            total += len(labels)
        return {"accuracy": correct / max(total, 1), "examples": total}


def xnnpack_delegated_ops(data: bytes) -> tuple[set[int] | None, str | None]:
    """Indices of the ops the XNNPACK delegate replaced, measured on a loaded interpreter.

    The interpreter lists every original node plus one DELEGATE node per partition; a partition is
    the set of ops that produce its outputs from its inputs, so walk back from each DELEGATE's
    outputs to its inputs.
    """
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_content=data, num_threads=1)
        interpreter.allocate_tensors()
    except (RuntimeError, ValueError) as err:
        return None, str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    details = interpreter._get_ops_details()
    originals = [d for d in details if d["op_name"] != "DELEGATE"]
    producer = {int(t): d["index"] for d in originals for t in d["outputs"]}
    by_index = {d["index"]: d for d in originals}
    delegated: set[int] = set()
    for node in details:
        if node["op_name"] != "DELEGATE":
            continue
        boundary = {int(t) for t in node["inputs"]}
        pending = [producer[int(t)] for t in node["outputs"] if int(t) in producer]
        while pending:
            op_index = pending.pop()
            if op_index in delegated:
                continue
            delegated.add(op_index)
            for t in by_index[op_index]["inputs"]:
                t = int(t)
                if t not in boundary and t in producer:
                    pending.append(producer[t])
    return delegated, None
