"""LiteRT's GPU accelerator: WebGPU (Dawn) on Vulkan, for evaluating and timing a ``.tflite``.

Framework-free: numpy, ``ai_edge_litert`` and ``flatbuffers`` only.

On a machine without a GPU, Vulkan comes from Mesa's software rasterizer (lavapipe/llvmpipe).
Dawn refuses Debian 12's Mesa 22.3 lavapipe; ``scripts/install_lavapipe.sh`` unpacks Mesa 25 from
bookworm-backports into ``<repo>/.cache/lavapipe`` (or ``$SPARSELITE_LAVAPIPE_DIR``). This module
activates that private driver *inside the running process*, before LiteRT creates its WebGPU
instance:

- ``VK_DRIVER_FILES`` (and the older name ``VK_ICD_FILENAMES``) is read by the Vulkan loader when an
  instance is created, so setting ``os.environ`` in-process is enough;
- ``LD_LIBRARY_PATH`` is read by the dynamic linker only at process start, so instead the private
  libraries the driver needs (a newer ``libdrm.so.2``; ``libvulkan.so.1`` when there is no system
  loader) are preloaded by absolute path. A later ``dlopen`` by soname then reuses them.

So no re-exec and no shell set-up is needed: the first ``GpuModel``/``gpu_compatibility``/
``adapter_info`` call does it. Sourcing ``.cache/lavapipe/env.sh`` before starting Python works too.

The private driver is not activated when ``VK_DRIVER_FILES``/``VK_ICD_FILENAMES`` already name
another driver, or when ``REQUIRE_HW_GPU=1`` (then the system's Vulkan drivers are used and a
software adapter is an error).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sparselite.errors import SparseliteError

INSTALL_HINT = (
    "run `bash scripts/install_lavapipe.sh` for a software Vulkan driver (Mesa 25 lavapipe), "
    "or set VK_DRIVER_FILES to a Vulkan ICD json"
)
_ICD_NAME = "lvp_icd.x86_64.json"
_LIBDIR = Path("root/usr/lib/x86_64-linux-gnu")
_SOFTWARE_NAMES = re.compile(r"llvmpipe|lavapipe|swiftshader|softpipe", re.IGNORECASE)
# VkPhysicalDeviceType
_VK_DEVICE_TYPES = {0: "other", 1: "integrated_gpu", 2: "discrete_gpu", 3: "virtual_gpu", 4: "cpu"}


def require_hw_gpu() -> bool:
    """True when ``REQUIRE_HW_GPU=1``: a software Vulkan adapter is then an error."""
    return os.environ.get("REQUIRE_HW_GPU", "") not in ("", "0")


def default_lavapipe_dir() -> Path:
    """Where ``scripts/install_lavapipe.sh`` puts the private Mesa: ``$SPARSELITE_LAVAPIPE_DIR`` or
    ``<repo>/.cache/lavapipe``."""
    env = os.environ.get("SPARSELITE_LAVAPIPE_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / ".cache" / "lavapipe"


def lavapipe_installed(root: Path | None = None) -> bool:
    root = Path(root) if root is not None else default_lavapipe_dir()
    return (root / _ICD_NAME).is_file()


def software_vulkan_env(root: Path | None = None) -> dict[str, str]:
    """Environment variables that select the private lavapipe; ``{}`` when it is not installed.

    Use it for subprocesses or a launching shell. In this process, call ``use_software_vulkan``.
    """
    root = Path(root) if root is not None else default_lavapipe_dir()
    icd = root / _ICD_NAME
    if not icd.is_file():
        return {}
    libdir = str(root / _LIBDIR)
    old = os.environ.get("LD_LIBRARY_PATH", "")
    paths = [libdir] + [p for p in old.split(":") if p and p != libdir]
    return {
        "VK_DRIVER_FILES": str(icd),
        "VK_ICD_FILENAMES": str(icd),
        "LD_LIBRARY_PATH": ":".join(paths),
    }


_activated: dict[str, str] | None = None


def use_software_vulkan(root: Path | None = None, *, force: bool = False) -> dict[str, str]:
    """Point this process's Vulkan loader at the private lavapipe. Returns the variables applied.

    Must run before LiteRT creates its WebGPU instance (the first GPU compile in the process).
    Does nothing (returns ``{}``) when lavapipe is not installed, when ``VK_DRIVER_FILES`` or
    ``VK_ICD_FILENAMES`` already name another driver, or when ``REQUIRE_HW_GPU=1``; ``force=True``
    overrides the last two.
    """
    global _activated
    if _activated is not None and not force:
        return _activated
    env = software_vulkan_env(root)
    if not env:
        return {}
    icd = env["VK_DRIVER_FILES"]
    if not force:
        if require_hw_gpu():
            return {}
        for name in ("VK_DRIVER_FILES", "VK_ICD_FILENAMES"):
            if os.environ.get(name) and os.environ[name] != icd:
                return {}
    os.environ["VK_DRIVER_FILES"] = icd
    os.environ["VK_ICD_FILENAMES"] = icd
    root = Path(icd).parent
    libdir = root / _LIBDIR
    preload = []
    order = root / "preload.txt"
    if order.is_file():
        preload = [Path(line) for line in order.read_text().split() if line]
    private_loader = libdir / "libvulkan.so.1"
    if private_loader.exists() and not ctypes.util.find_library("vulkan"):
        preload.append(private_loader)
    for lib in preload:
        # RTLD_GLOBAL + an absolute path: later dlopen("libdrm.so.2") by the driver finds this copy.
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    _activated = {"VK_DRIVER_FILES": icd, "VK_ICD_FILENAMES": icd}
    return _activated


# --- Vulkan adapter probe (ctypes; no Vulkan SDK needed) -------------------------------------------


class _VkApplicationInfo(ctypes.Structure):
    _fields_ = [
        ("sType", ctypes.c_int),
        ("pNext", ctypes.c_void_p),
        ("pApplicationName", ctypes.c_char_p),
        ("applicationVersion", ctypes.c_uint32),
        ("pEngineName", ctypes.c_char_p),
        ("engineVersion", ctypes.c_uint32),
        ("apiVersion", ctypes.c_uint32),
    ]


class _VkInstanceCreateInfo(ctypes.Structure):
    _fields_ = [
        ("sType", ctypes.c_int),
        ("pNext", ctypes.c_void_p),
        ("flags", ctypes.c_uint32),
        ("pApplicationInfo", ctypes.POINTER(_VkApplicationInfo)),
        ("enabledLayerCount", ctypes.c_uint32),
        ("ppEnabledLayerNames", ctypes.c_void_p),
        ("enabledExtensionCount", ctypes.c_uint32),
        ("ppEnabledExtensionNames", ctypes.c_void_p),
    ]


@dataclass(frozen=True)
class VulkanDevice:
    name: str
    device_type: str  # "cpu" for software rasterizers
    vendor_id: int
    api_version: str
    software: bool


def _vulkan_devices() -> list[VulkanDevice]:
    """Physical devices the Vulkan loader sees, through the loader's C API."""
    try:
        vk = ctypes.CDLL("libvulkan.so.1")
    except OSError as exc:
        raise SparseliteError(
            f"no Vulkan loader (libvulkan.so.1) for LiteRT's GPU accelerator: {INSTALL_HINT}"
        ) from exc
    app = _VkApplicationInfo(0, None, b"sparselite", 1, b"sparselite", 1, (1 << 22) | (1 << 12))
    info = _VkInstanceCreateInfo(1, None, 0, ctypes.pointer(app), 0, None, 0, None)
    instance = ctypes.c_void_p()
    vk.vkCreateInstance.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    vk.vkEnumeratePhysicalDevices.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    vk.vkGetPhysicalDeviceProperties.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    vk.vkDestroyInstance.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    result = vk.vkCreateInstance(ctypes.byref(info), None, ctypes.byref(instance))
    if result != 0:  # VK_ERROR_INCOMPATIBLE_DRIVER (-9) when no driver is found
        return []
    try:
        count = ctypes.c_uint32(0)
        vk.vkEnumeratePhysicalDevices(instance, ctypes.byref(count), None)
        handles = (ctypes.c_void_p * count.value)()
        vk.vkEnumeratePhysicalDevices(instance, ctypes.byref(count), handles)
        devices = []
        for handle in handles[: count.value]:
            # VkPhysicalDeviceProperties: apiVersion, driverVersion, vendorID, deviceID (uint32 each),
            # deviceType (enum), deviceName[256], ... (the rest is not read; 4 KiB is ample room).
            props = ctypes.create_string_buffer(4096)
            vk.vkGetPhysicalDeviceProperties(handle, props)
            api, _, vendor, _, dtype = np.frombuffer(props.raw[:20], dtype=np.uint32)
            name = props.raw[20:276].split(b"\0", 1)[0].decode(errors="replace")
            kind = _VK_DEVICE_TYPES.get(int(dtype), str(int(dtype)))
            devices.append(
                VulkanDevice(
                    name=name,
                    device_type=kind,
                    vendor_id=int(vendor),
                    api_version=f"{api >> 22}.{(api >> 12) & 0x3FF}.{api & 0xFFF}",
                    software=kind == "cpu" or bool(_SOFTWARE_NAMES.search(name)),
                )
            )
        return devices
    finally:
        vk.vkDestroyInstance(instance, None)


_dawn_adapter: str | None = None  # Dawn logs its choice once per process, when WebGPU starts


_devices: list[VulkanDevice] | None = None


def adapter_info(*, refresh: bool = False) -> dict[str, Any]:
    """The Vulkan adapters this process can use, and whether the one in use is software.

    Keys: ``devices`` (name, device_type, vendor_id, api_version, software), ``selected`` (the
    device LiteRT uses: Dawn's own report once a GPU model was compiled, else the first hardware
    device, else the first), ``software`` (bool), ``software_vulkan`` (the private-lavapipe variables
    applied, ``{}`` if none). Raises ``SparseliteError`` when there is no Vulkan device.
    """
    global _devices
    applied = use_software_vulkan()
    if _devices is None or refresh:
        _devices = _vulkan_devices()
    devices = _devices
    if not devices:
        where = os.environ.get("VK_DRIVER_FILES") or os.environ.get("VK_ICD_FILENAMES")
        detail = f" (VK_DRIVER_FILES={where})" if where else ""
        raise SparseliteError(
            f"no Vulkan device for LiteRT's GPU accelerator{detail}: {INSTALL_HINT}"
        )
    hardware = [d for d in devices if not d.software]
    selected = (hardware or devices)[0]
    info: dict[str, Any] = {
        "devices": [asdict(d) for d in devices],
        "selected": selected.name,
        "software": selected.software,
        "software_vulkan": dict(applied),
    }
    if _dawn_adapter is not None:
        info["selected"] = _dawn_adapter
        info["software"] = bool(
            re.search(r"arch=software|adapterType=CPU", _dawn_adapter)
            or _SOFTWARE_NAMES.search(_dawn_adapter)
        )
    return info


_probed: bool = False


def _ensure_vulkan() -> None:
    global _probed
    if not _probed:
        adapter_info()  # raises with the install hint when there is no device
        _probed = True


# --- native log capture ----------------------------------------------------------------------------


@contextlib.contextmanager
def _native_stderr() -> Iterator[list[str]]:
    """Capture what LiteRT's C++ writes to fd 2 (its errors name the ops the GPU refused)."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def _note_adapter(log: str) -> None:
    global _dawn_adapter
    m = re.search(r"Selected adapter: (.*)", log)
    if m:
        _dawn_adapter = m.group(1).strip()


def _webgpu_failed(log: str) -> bool:
    return "Failed to initialize WebGPU environment" in log or "No supported adapters" in log


# --- model --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name, e.g. "float32", "int8"
    scale: float | None = None  # int8 tensors: real = scale * (q - zero_point)
    zero_point: int | None = None


_NP = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8,
       "int32": np.int32, "bool": np.bool_}


def _quant_params(path: Path, tensor_index: int) -> tuple[float | None, int | None]:
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(path.read_bytes(), 0)
    q = model.Subgraphs(0).Tensors(tensor_index).Quantization()
    if q is None or q.ScaleLength() != 1:
        return None, None
    return float(q.Scale(0)), int(q.ZeroPoint(0)) if q.ZeroPointLength() else 0


class GpuModel:
    """A ``.tflite`` compiled for LiteRT's GPU accelerator.

    ``precision="fp16"`` is LiteRT's default (fast; about 1e-3 relative error);
    ``"fp32"`` sets ``GpuOptions(enforce_f32=True)`` for parity with the CPU.
    GPU-only by default, so construction fails unless every op runs on the GPU (use
    ``gpu_compatibility`` to see which do not); ``allow_cpu_fallback=True`` adds the CPU.

    One input, one output. ``model(x)`` takes any batch: it runs the model's own batch size (often
    fixed at 1) in a loop. Float input is quantized for an int8 input tensor, and an int8 output is
    dequantized, so ``model(x)`` always speaks float32 unless ``raw=True``.

    ``require_hardware`` (default: ``REQUIRE_HW_GPU=1``) makes a software adapter an error.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        precision: str = "fp16",
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
        _ensure_vulkan()
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
            raise SparseliteError(f"{self.path.name}: GPU compile failed: {error.strip()}")
        self._model = compiled
        self.adapter = adapter_info()
        if require_hardware is None:
            require_hardware = require_hw_gpu()
        if require_hardware and self.adapter["software"]:
            raise SparseliteError(
                f"REQUIRE_HW_GPU=1 but the Vulkan adapter is software ({self.adapter['selected']}); "
                "run on a machine with a GPU and its Vulkan driver, without VK_DRIVER_FILES"
            )
        self.fully_accelerated = bool(compiled.is_fully_accelerated())
        signatures = compiled.get_signature_list()
        self._signature = next(iter(signatures))
        ins = compiled.get_input_tensor_details(self._signature)
        outs = compiled.get_output_tensor_details(self._signature)
        if len(ins) != 1 or len(outs) != 1:
            raise SparseliteError(
                f"{self.path.name}: GpuModel runs models with one input and one output, "
                f"this one has {len(ins)} and {len(outs)}"
            )
        self.input = self._info(next(iter(ins.values())))
        self.output = self._info(next(iter(outs.values())))
        self._in = compiled.create_input_buffers(0)
        self._out = compiled.create_output_buffers(0)

    def _info(self, d: dict[str, Any]) -> TensorInfo:
        scale, zp = (None, None)
        if d["dtype"] in ("int8", "uint8"):
            scale, zp = _quant_params(self.path, int(d["index"]))
        return TensorInfo(d["name"], tuple(int(s) for s in d["shape"]), d["dtype"], scale, zp)

    @property
    def batch_size(self) -> int:
        """The batch the model was exported with; ``__call__`` loops over larger batches."""
        return self.input.shape[0] if self.input.shape else 1

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        dtype = _NP[self.input.dtype]
        if x.dtype == dtype:
            return np.ascontiguousarray(x)
        if self.input.scale is not None and np.issubdtype(x.dtype, np.floating):
            info = np.iinfo(dtype)
            q = np.round(x / self.input.scale) + self.input.zero_point
            return np.clip(q, info.min, info.max).astype(dtype)
        return np.ascontiguousarray(x.astype(dtype))

    def _finish(self, y: np.ndarray, raw: bool) -> np.ndarray:
        if raw or self.output.scale is None:
            return y
        return ((y.astype(np.float32) - self.output.zero_point) * self.output.scale).astype(np.float32)

    def _run_one(self, chunk: np.ndarray) -> np.ndarray:
        self._in[0].write(chunk)
        self._model.run_by_index(0, self._in, self._out)
        n = int(np.prod(self.output.shape))
        return self._out[0].read(n, _NP[self.output.dtype]).reshape(self.output.shape)

    def __call__(self, x: np.ndarray, *, raw: bool = False) -> np.ndarray:
        x = self._prepare(x)
        per_run = self.input.shape
        if tuple(x.shape) == per_run:
            return self._finish(self._run_one(x), raw)
        b = self.batch_size
        if tuple(x.shape[1:]) != per_run[1:] or x.shape[0] % b:
            raise SparseliteError(
                f"{self.path.name}: input shape {tuple(x.shape)} does not fit the model's "
                f"{per_run} (batch must be a multiple of {b})"
            )
        outs = [self._run_one(x[i : i + b]) for i in range(0, x.shape[0], b)]
        return self._finish(np.concatenate(outs, axis=0), raw)

    def timed_call(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """``(output, seconds)`` for write + run + read of the whole batch.

        ``run`` returns before the GPU finishes; only reading the output waits for it, so the read
        belongs in the timing. On lavapipe the "GPU" is the CPU: such timings are no claim about
        GPU performance.
        """
        x = self._prepare(x)
        start = time.perf_counter()
        y = self(x, raw=True)
        seconds = time.perf_counter() - start
        return self._finish(y, raw=False), seconds

    def __repr__(self) -> str:
        return (
            f"GpuModel({str(self.path)!r}, precision={self.precision!r}, "
            f"input={self.input.shape}:{self.input.dtype}, output={self.output.shape}:{self.output.dtype}, "
            f"adapter={self.adapter['selected']!r})"
        )


def _compile(path: Path, precision: str, allow_cpu_fallback: bool):
    """(compiled model or None, native log, error text)."""
    from ai_edge_litert.compiled_model import CompiledModel, GpuOptions, HardwareAccelerator, Options

    _ensure_vulkan()  # LiteRT keeps a failed WebGPU start for the life of the process
    accel = HardwareAccelerator.GPU
    if allow_cpu_fallback:
        accel = accel | HardwareAccelerator.CPU
    options = Options(
        hardware_accelerators=accel,
        gpu_options=GpuOptions(enforce_f32=precision == "fp32"),
    )
    error = ""
    compiled = None
    with _native_stderr() as captured:
        try:
            compiled = CompiledModel.from_file(str(path), options=options)
        except RuntimeError as exc:
            error = str(exc)
    log = captured[0] if captured else ""
    _note_adapter(log)
    return compiled, log, error


# --- compatibility report ------------------------------------------------------------------------


def _model_ops(path: Path) -> list[dict[str, Any]]:
    """Every operator of subgraph 0: index, op name, output tensor names."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.Model.GetRootAsModel(path.read_bytes(), 0)
    graph = model.Subgraphs(0)
    ops = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = names.get(builtin, str(builtin))
        if name == "CUSTOM" and code.CustomCode():
            name = code.CustomCode().decode()
        outputs = [graph.Tensors(int(t)).Name().decode() for t in op.OutputsAsNumpy() if t >= 0]
        ops.append({"op": name, "index": i, "version": code.Version(), "outputs": outputs})
    return ops


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
    _ensure_vulkan()
    compiled, log, error = _compile(path, "fp32", allow_cpu_fallback=False)
    if compiled is None and _webgpu_failed(log):
        raise SparseliteError(
            f"LiteRT's WebGPU backend found no usable Vulkan adapter: {INSTALL_HINT}"
        )
    info = adapter_info()
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


__all__ = [
    "GpuModel",
    "TensorInfo",
    "VulkanDevice",
    "adapter_info",
    "default_lavapipe_dir",
    "gpu_compatibility",
    "lavapipe_installed",
    "require_hw_gpu",
    "software_vulkan_env",
    "use_software_vulkan",
]
