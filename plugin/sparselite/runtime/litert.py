"""``LiteRTModel``: run a .tflite on ai-edge-litert (XNNPACK, reference kernels, or the GPU accelerator)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from sparselite.errors import SparseliteError
from sparselite.tflite.flatbuffer import read_model

ACCELERATORS = ("xnnpack", "reference", "gpu")


class LiteRTModel:
    """A single-input, single-output TFLite model as a callable over numpy batches of any size.

    Args:
        path: the .tflite file.
        accelerator: 'xnnpack' (LiteRT's default CPU delegate), 'reference' (builtin kernels, no
            delegate: slow, but the semantics TFLite defines), or 'gpu' (LiteRT's GPU accelerator).
        threads: CPU threads for 'xnnpack' / 'reference'.
        gpu_precision / allow_cpu_fallback: passed to the GPU accelerator.

    Float inputs are quantized for an int8-input model, and int8 outputs are dequantized, so
    ``model(x)`` always takes and returns float32; ``run_raw`` skips both.
    """

    def __init__(self, path: str | Path, accelerator: str = "xnnpack", threads: int = 1,
                 gpu_precision: str = "fp16", allow_cpu_fallback: bool = False) -> None:
        if accelerator not in ACCELERATORS:
            raise SparseliteError(f"accelerator='{accelerator}' is not one of {', '.join(ACCELERATORS)}")
        if threads < 1:
            raise SparseliteError(f"threads={threads} must be >= 1")
        self.path = Path(path)
        if not self.path.is_file():
            raise SparseliteError(f"{self.path} does not exist; export a model first (sparselite export)")
        read_model(self.path)  # a corrupt file gets a clear error naming it here, not a crash in C++
        self.accelerator, self.threads = accelerator, threads
        if accelerator == "gpu":
            from sparselite.runtime.gpu import GpuModel

            self._gpu = GpuModel(self.path, precision=gpu_precision, allow_cpu_fallback=allow_cpu_fallback)
            given, produced = self._gpu.input, self._gpu.output
            self.input_shape, self.input_dtype = tuple(given.shape), np.dtype(given.dtype).type
            self.output_shape, self.output_dtype = tuple(produced.shape), np.dtype(produced.dtype).type
            self.input_quantization = (given.scale or 0.0, given.zero_point or 0)
            self.output_quantization = (produced.scale or 0.0, produced.zero_point or 0)
            return
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        resolver = OpResolverType.AUTO if accelerator == "xnnpack" else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            self._interpreter = Interpreter(model_path=str(self.path), num_threads=threads,
                                            experimental_op_resolver_type=resolver)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            raise SparseliteError(f"LiteRT ({accelerator}) could not load {self.path}: {str(err).splitlines()[0]}") from None
        inputs, outputs = self._interpreter.get_input_details(), self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise SparseliteError(f"{self.path} has {len(inputs)} inputs and {len(outputs)} outputs; LiteRTModel runs single-input, single-output models")
        self._input, self._output = inputs[0], outputs[0]
        self.input_shape, self.input_dtype = tuple(self._input["shape"]), self._input["dtype"]
        self.output_shape, self.output_dtype = tuple(self._output["shape"]), self._output["dtype"]
        self.input_quantization = tuple(self._input["quantization"])
        self.output_quantization = tuple(self._output["quantization"])

    @property
    def batch_size(self) -> int:
        return int(self.input_shape[0])

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        if self.accelerator == "gpu":
            return self._gpu(x, raw=True)
        self._interpreter.set_tensor(self._input["index"], x)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output["index"]).copy()

    def run_raw(self, x: np.ndarray) -> np.ndarray:
        """Run a batch in the model's own I/O dtypes; batches larger than the model's are looped."""
        if x.shape[1:] != self.input_shape[1:]:
            raise SparseliteError(f"input shape {x.shape} does not match the model's {self.input_shape}")
        step = self.batch_size
        if len(x) == step:
            return self._invoke(np.ascontiguousarray(x, dtype=self.input_dtype))
        if len(x) % step:
            raise SparseliteError(f"batch of {len(x)} is not a multiple of the model's batch size {step}")
        return np.concatenate([self._invoke(np.ascontiguousarray(x[i : i + step], dtype=self.input_dtype))
                               for i in range(0, len(x), step)])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if self.input_dtype == np.int8 and x.dtype != np.int8:
            scale, zero_point = self.input_quantization
            x = np.clip(np.round(x / scale) + zero_point, -128, 127).astype(np.int8)
        y = self.run_raw(x)
        if self.output_dtype == np.int8:
            scale, zero_point = self.output_quantization
            y = (y.astype(np.float32) - zero_point) * scale
        return y

    def evaluate(self, batches: Iterable) -> dict[str, float]:
        """Top-1 accuracy over an iterable of (inputs, labels) batches (torch tensors or numpy)."""
        correct = total = 0
        for inputs, labels in batches:
            logits = self(np.asarray(inputs))
            correct += int((logits.argmax(1) == np.asarray(labels)).sum())
            total += len(labels)
        return {"accuracy": correct / max(total, 1), "examples": total}
