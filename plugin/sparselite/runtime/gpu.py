"""LiteRT's GPU accelerator (WebGPU/Dawn on Vulkan) as a ``LiteRTModel`` backend, and the GPU
compatibility report (which ops the accelerator refuses).

Framework-free: numpy and ``ai_edge_litert`` only. The Vulkan driver set-up (a private lavapipe on
machines without a GPU) is ``sparselite.runtime.vulkan``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sparselite.errors import SparseliteError
from sparselite.runtime.backend import TensorInfo
from sparselite.runtime.native_log import captured_native_stderr
from sparselite.runtime.vulkan import INSTALL_HINT, VULKAN, require_hw_gpu
from sparselite.tflite.flatbuffer import read_model
from sparselite.tflite.ops import op_list

_NP = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8,
       "int32": np.int32, "bool": np.bool_}


class GpuBackend:
    """A ``.tflite`` compiled for LiteRT's GPU accelerator (run it through ``LiteRTModel``).

    ``precision="fp16"`` is LiteRT's default (fast; about 1e-3 relative error);
    ``"fp32"`` sets ``GpuOptions(enforce_f32=True)`` for parity with the CPU.
    GPU-only by default, so construction fails unless every op runs on the GPU (use
    ``gpu_compatibility`` to see which do not); ``allow_cpu_fallback=True`` adds the CPU.
    One input, one output. ``require_hardware`` (default: ``REQUIRE_HW_GPU=1``) makes a software
    adapter an error.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        precision: Literal["fp16", "fp32"] = "fp16",
        allow_cpu_fallback: bool = False,
        require_hardware: bool | None = None,
    ) -> None:
        if precision not in ("fp16", "fp32"):
            raise SparseliteError(f"precision must be 'fp16' or 'fp32', got {precision!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise SparseliteError(f"no model file at {self.path}")
        self.precision = precision
        self.allow_cpu_fallback = allow_cpu_fallback
        model = read_model(self.path)  # validated (tflite.validate) before LiteRT's C++ sees the file
        VULKAN.ensure_device()
        compiled, log, error = _compile(self.path, precision, allow_cpu_fallback)
        self.compile_log = log
        if compiled is None:
            if _webgpu_failed(log):
                raise SparseliteError(
                    f"LiteRT's WebGPU backend found no usable Vulkan adapter "
                    f"(Debian 12's Mesa 22.3 lavapipe is refused): {INSTALL_HINT}"
                )
            if "Some ops are not accelerated" in error:
                names = sorted({op["op"] for op in _unsupported_from_log(self.path, log)})
                raise SparseliteError(
                    f"{self.path.name}: ops not supported by the GPU accelerator: "
                    f"{', '.join(names) or '(unknown)'}; see gpu_compatibility(path), "
                    f"or pass allow_cpu_fallback=True"
                )
            raise SparseliteError(f"{self.path.name}: GPU compile failed: {_one_line(error)}")
        self._model = compiled
        self.adapter = VULKAN.adapter_info()
        if require_hardware is None:
            require_hardware = require_hw_gpu()
        if require_hardware and self.adapter["software"]:
            raise SparseliteError(
                f"REQUIRE_HW_GPU=1 but the Vulkan adapter is software ({self.adapter['selected']}); "
                "run on a machine with a GPU and its Vulkan driver, without VK_DRIVER_FILES"
            )
        self.fully_accelerated = bool(compiled.is_fully_accelerated())
        signature = next(iter(compiled.get_signature_list()))
        ins = compiled.get_input_tensor_details(signature)
        outs = compiled.get_output_tensor_details(signature)
        if len(ins) != 1 or len(outs) != 1:
            raise SparseliteError(
                f"{self.path.name}: the GPU backend runs models with one input and one output, "
                f"this one has {len(ins)} and {len(outs)}"
            )
        tensors = model.subgraphs[0].tensors
        self.input = _info(next(iter(ins.values())), tensors)
        self.output = _info(next(iter(outs.values())), tensors)
        self._in = compiled.create_input_buffers(0)
        self._out = compiled.create_output_buffers(0)

    def invoke(self, x: np.ndarray) -> np.ndarray:
        # ``run`` returns before the GPU finishes; reading the output waits for it.
        self._in[0].write(x)
        try:
            self._model.run_by_index(0, self._in, self._out)
        except RuntimeError as err:  # a kernel refused what the file declares
            raise SparseliteError(f"{self.path.name}: the GPU accelerator could not run it: {_one_line(str(err))}") from None
        n = int(np.prod(self.output.shape))
        return self._out[0].read(n, self.output.dtype).reshape(self.output.shape)

    def __repr__(self) -> str:
        return (
            f"GpuBackend({str(self.path)!r}, precision={self.precision!r}, "
            f"input={self.input.shape}:{np.dtype(self.input.dtype).name}, "
            f"output={self.output.shape}:{np.dtype(self.output.dtype).name}, adapter={self.adapter['selected']!r})"
        )


def _info(details: dict[str, Any], tensors: list) -> TensorInfo:
    scale = zero_point = None
    if details["dtype"] in ("int8", "uint8"):
        q = tensors[int(details["index"])].quantization
        if q is not None and q.scale is not None and len(q.scale) == 1:
            scale = float(q.scale[0])
            zero_point = int(q.zeroPoint[0]) if q.zeroPoint is not None and len(q.zeroPoint) else 0
    return TensorInfo(details["name"], tuple(int(s) for s in details["shape"]), _NP[details["dtype"]], scale, zero_point)


def _one_line(error: str) -> str:
    """LiteRT's errors are a trace of indented "└ ERROR: [file:line]" lines; keep them on one line."""
    return " ".join(line.strip(" └") for line in error.splitlines() if line.strip(" └")) or "no reason given"


def _webgpu_failed(log: str) -> bool:
    return "Failed to initialize WebGPU environment" in log or "No supported adapters" in log


def _compile(path: Path, precision: str, allow_cpu_fallback: bool):
    """(compiled model or None, native log, error text)."""
    from ai_edge_litert.compiled_model import CompiledModel, GpuOptions, HardwareAccelerator, Options

    VULKAN.ensure_device()  # LiteRT keeps a failed WebGPU start for the life of the process
    accel = HardwareAccelerator.GPU
    if allow_cpu_fallback:
        accel = accel | HardwareAccelerator.CPU
    options = Options(
        hardware_accelerators=accel,
        gpu_options=GpuOptions(enforce_f32=precision == "fp32"),
    )
    error = ""
    compiled = None
    with captured_native_stderr() as captured:
        try:
            with VULKAN.driver_environment():  # LiteRT's WebGPU start reads the driver variables here
                compiled = CompiledModel.from_file(str(path), options=options)
        except RuntimeError as exc:
            error = str(exc)
    log = captured[0] if captured else ""
    VULKAN.note_dawn_log(log)
    return compiled, log, error


# --- compatibility report ------------------------------------------------------------------------


def _model_ops(path: Path) -> list[dict[str, Any]]:
    """Every operator of subgraph 0: index, op name, version, output tensor names."""
    return [{"op": e.op, "index": e.index, "version": e.version, "outputs": list(e.outputs)}
            for e in op_list(read_model(path))]


def _unsupported_from_log(path: Path, log: str) -> list[dict[str, Any]]:
    """Ops the GPU delegate refused, from its "Following operations are not supported" list.

    The delegate lists op *types* with a reason ("GATHER_ND: Operation is not supported."), so every
    op of a listed type is reported; when only some instances of a type were refused (e.g. by
    dtype), the others are listed too.
    """
    reasons: dict[str, list[str]] = {}
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if "Following operations are not supported by GPU delegate" not in line:
            continue
        for entry in lines[i + 1 :]:
            if re.match(r"\s*\d+ operations will run on the GPU", entry) or not entry.strip():
                break
            m = re.match(r"\s*([A-Za-z0-9_]+): (.*)", entry)
            if not m:
                break
            reasons.setdefault(m.group(1), []).append(m.group(2).strip())
    for m in re.finditer(r"Didn't find op for builtin opcode '([A-Z0-9_]+)'", log):
        reasons.setdefault(m.group(1), []).append("not in this LiteRT runtime (the model cannot load)")
    report = []
    for op in _model_ops(path):
        if op["op"] in reasons:
            report.append({**op, "reason": "; ".join(dict.fromkeys(reasons[op["op"]]))})
    return report


def gpu_compatibility(path: str | os.PathLike) -> dict[str, Any]:
    """Whether every op of ``path`` runs on LiteRT's GPU accelerator, and which do not.

    Compiles GPU-only (the only way to prove full delegation). JSON-serializable keys:
    ``path``, ``fully_accelerated``, ``adapter`` (name LiteRT's WebGPU selected), ``software_adapter``,
    ``ops`` (count), ``unsupported_ops`` (list of ``{op, index, version, outputs, reason}``; output
    tensor names from litert-torch carry the torch module path), ``ops_on_gpu``/``ops_on_cpu``
    (the delegate's partition counts, when it reports them), ``error`` (None when compiled).
    Raises ``SparseliteError`` when there is no Vulkan device at all.
    """
    path = Path(path)
    if not path.is_file():
        raise SparseliteError(f"no model file at {path}")
    read_model(path)  # validated before LiteRT's C++ sees the file
    VULKAN.ensure_device()
    compiled, log, error = _compile(path, "fp32", allow_cpu_fallback=False)
    if compiled is None and _webgpu_failed(log):
        raise SparseliteError(
            f"LiteRT's WebGPU backend found no usable Vulkan adapter: {INSTALL_HINT}"
        )
    info = VULKAN.adapter_info()
    report: dict[str, Any] = {
        "path": str(path),
        "fully_accelerated": bool(compiled is not None and compiled.is_fully_accelerated()),
        "adapter": info["selected"],
        "software_adapter": info["software"],
        "ops": len(_model_ops(path)),
        "unsupported_ops": [],
        "ops_on_gpu": None,
        "ops_on_cpu": None,
        "error": None,
    }
    if compiled is None:
        report["error"] = " ".join(line.strip(" └") for line in error.splitlines() if line.strip())
        report["unsupported_ops"] = _unsupported_from_log(path, log)
        m = re.search(r"(\d+) operations will run on the GPU, and the remaining (\d+)", log)
        if m:
            report["ops_on_gpu"], report["ops_on_cpu"] = int(m.group(1)), int(m.group(2))
    else:
        report["ops_on_gpu"], report["ops_on_cpu"] = report["ops"], 0
    return report
