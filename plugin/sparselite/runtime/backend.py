"""The backend interface ``LiteRTModel`` runs on: one batch of the model's own shape and dtypes in,
its output out. Quantizing, dequantizing and batching live once, in ``LiteRTModel``.

Backends: ``InterpreterBackend`` (XNNPACK or the reference kernels) and ``gpu.GpuBackend``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from sparselite.errors import SparseliteError


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: type  # numpy scalar type, e.g. np.float32, np.int8
    scale: float | None = None  # quantized tensors: real = scale * (q - zero_point)
    zero_point: int | None = None


class Backend(Protocol):
    input: TensorInfo
    output: TensorInfo

    def invoke(self, x: np.ndarray) -> np.ndarray:
        """Run one batch shaped and typed exactly as ``input``; returns ``output`` (a copy)."""


class InterpreterBackend:
    """ai-edge-litert's ``Interpreter``: 'xnnpack' (its default CPU delegate) or 'reference' (the
    builtin kernels, no delegate: slow, but the semantics TFLite defines)."""

    def __init__(self, path: Path, accelerator: str, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        self._path = path
        resolver = OpResolverType.AUTO if accelerator == "xnnpack" else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            self._interpreter = Interpreter(model_path=str(path), num_threads=threads,
                                            experimental_op_resolver_type=resolver)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            raise SparseliteError(f"LiteRT ({accelerator}) could not load {path}: {_first_line(err)}") from None
        inputs, outputs = self._interpreter.get_input_details(), self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise SparseliteError(f"{path} has {len(inputs)} inputs and {len(outputs)} outputs; LiteRTModel runs single-input, single-output models")
        self._input_index, self._output_index = inputs[0]["index"], outputs[0]["index"]
        self.input, self.output = _tensor_info(inputs[0]), _tensor_info(outputs[0])

    def invoke(self, x: np.ndarray) -> np.ndarray:
        self._interpreter.set_tensor(self._input_index, x)
        try:
            self._interpreter.invoke()
        except RuntimeError as err:  # a kernel refused what the file declares (e.g. a reshape that cannot fit)
            raise SparseliteError(f"LiteRT could not run {self._path}: {_first_line(err)}") from None
        return self._interpreter.get_tensor(self._output_index).copy()


def _first_line(err: BaseException) -> str:
    """LiteRT's messages run over several lines (and glue "Node number N failed" onto the first)."""
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


def _tensor_info(details: dict) -> TensorInfo:
    scale, zero_point = details["quantization"]
    quantized = np.issubdtype(details["dtype"], np.integer)
    return TensorInfo(details["name"], tuple(int(s) for s in details["shape"]), details["dtype"],
                      float(scale) if quantized else None, int(zero_point) if quantized else None)
