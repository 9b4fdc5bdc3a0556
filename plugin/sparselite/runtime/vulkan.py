"""The Vulkan driver LiteRT's GPU accelerator (WebGPU/Dawn) runs on: private lavapipe activation and
the adapter probe. Its state (what was activated, the devices seen, Dawn's choice) lives in one
``VulkanDriver`` object per process, ``VULKAN``: Vulkan instances and LiteRT's WebGPU start are
process-wide.

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

So no re-exec and no shell set-up is needed: the first ``GpuBackend``/``gpu_compatibility``/
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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


def lavapipe_dirs() -> list[Path]:
    """Where the private Mesa is looked for, in order, the same for editable and regular installs:

    1. ``$SPARSELITE_LAVAPIPE_DIR``, when set (then only there);
    2. ``<checkout>/.cache/lavapipe`` when sparselite runs from a source checkout (the package sits in
       ``<checkout>/plugin/sparselite`` next to ``<checkout>/pyproject.toml``): where
       ``scripts/install_lavapipe.sh`` puts it;
    3. ``${XDG_CACHE_HOME:-~/.cache}/sparselite/lavapipe``: the per-user place, for regular installs
       (``SPARSELITE_LAVAPIPE_DIR=~/.cache/sparselite/lavapipe bash scripts/install_lavapipe.sh``).

    Never relative to ``site-packages``.
    """
    env = os.environ.get("SPARSELITE_LAVAPIPE_DIR")
    if env:
        return [Path(env)]
    dirs = []
    checkout = Path(__file__).resolve().parents[3]
    if (checkout / "pyproject.toml").is_file() and (checkout / "plugin" / "sparselite").is_dir():
        dirs.append(checkout / ".cache" / "lavapipe")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    dirs.append(cache / "sparselite" / "lavapipe")
    return dirs


def default_lavapipe_dir() -> Path:
    """The first of ``lavapipe_dirs()`` that holds an installed driver, else the first of them."""
    dirs = lavapipe_dirs()
    return next((d for d in dirs if (d / _ICD_NAME).is_file()), dirs[0])


def lavapipe_installed(root: Path | None = None) -> bool:
    root = Path(root) if root is not None else default_lavapipe_dir()
    return (root / _ICD_NAME).is_file()


def preload_paths(root: Path) -> list[Path]:
    """The libraries ``root/preload.txt`` lists, in order; each must resolve inside ``root`` (they are
    loaded RTLD_GLOBAL into this process: a path elsewhere would load arbitrary code)."""
    order = root / "preload.txt"
    if not order.is_file():
        return []
    inside = root.resolve()
    paths = []
    for line in order.read_text().split():
        lib = (root / line).resolve()  # relative entries are relative to the driver folder
        if not lib.is_relative_to(inside):
            raise SparseliteError(f"{order} lists {line}, outside the driver folder {inside}; only libraries "
                                  "inside it are preloaded. Reinstall with `bash scripts/install_lavapipe.sh`")
        if not lib.is_file():
            raise SparseliteError(f"{order} lists {line}, which does not exist; reinstall with "
                                  "`bash scripts/install_lavapipe.sh`")
        paths.append(lib)
    return paths


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


def vulkan_devices() -> list[VulkanDevice]:
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


class VulkanDriver:
    """This process's Vulkan set-up for LiteRT's GPU accelerator.

    State: ``activated`` (the private-lavapipe variables applied, once), ``devices`` (the probe's
    result, cached), ``dawn_adapter`` (the adapter Dawn logged when WebGPU started; it logs that once
    per process) and ``probed`` (a device was found, so compiles may go ahead).
    """

    def __init__(self) -> None:
        self.activated: dict[str, str] | None = None
        self.devices: list[VulkanDevice] | None = None
        self.dawn_adapter: str | None = None
        self.probed = False

    def use_software_vulkan(self, root: Path | None = None, *, force: bool = False) -> dict[str, str]:
        """Point this process's Vulkan loader at the private lavapipe. Returns the variables applied.

        Must run before LiteRT creates its WebGPU instance (the first GPU compile in the process).
        Does nothing (returns ``{}``) when lavapipe is not installed, when ``VK_DRIVER_FILES`` or
        ``VK_ICD_FILENAMES`` already name another driver, or when ``REQUIRE_HW_GPU=1``; ``force=True``
        overrides the last two.
        """
        if self.activated is not None and not force:
            return self.activated
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
        root = Path(icd).parent
        libdir = root / _LIBDIR
        preload = preload_paths(root)
        private_loader = libdir / "libvulkan.so.1"
        if private_loader.exists() and not ctypes.util.find_library("vulkan"):
            preload.append(private_loader)
        for lib in preload:
            # RTLD_GLOBAL + an absolute path: later dlopen("libdrm.so.2") by the driver finds this copy.
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        # Not written to os.environ for good: child processes must not inherit a private driver.
        # ``driver_environment()`` applies them around the calls that create a Vulkan instance.
        self.activated = {"VK_DRIVER_FILES": icd, "VK_ICD_FILENAMES": icd}
        return self.activated

    @contextlib.contextmanager
    def driver_environment(self) -> Iterator[None]:
        """The private driver's variables in ``os.environ`` while the Vulkan loader reads them (an
        instance being created), and the previous values back afterwards."""
        applied = self.use_software_vulkan()
        previous = {name: os.environ.get(name) for name in applied}
        os.environ.update(applied)
        try:
            yield
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def adapter_info(self, *, refresh: bool = False) -> dict[str, Any]:
        """The Vulkan adapters this process can use, and whether the one in use is software.

        Keys: ``devices`` (name, device_type, vendor_id, api_version, software), ``selected`` (the
        device LiteRT uses: Dawn's own report once a GPU model was compiled, else the first hardware
        device, else the first), ``software`` (bool), ``software_vulkan`` (the private-lavapipe variables
        applied, ``{}`` if none). Raises ``SparseliteError`` when there is no Vulkan device.
        """
        applied = self.use_software_vulkan()
        if self.devices is None or refresh:
            with self.driver_environment():
                self.devices = vulkan_devices()
        devices = self.devices
        if not devices:
            where = (applied.get("VK_DRIVER_FILES") or os.environ.get("VK_DRIVER_FILES")
                     or os.environ.get("VK_ICD_FILENAMES"))
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
        if self.dawn_adapter is not None:
            info["selected"] = self.dawn_adapter
            info["software"] = bool(
                re.search(r"arch=software|adapterType=CPU", self.dawn_adapter)
                or _SOFTWARE_NAMES.search(self.dawn_adapter)
            )
        return info

    def ensure_device(self) -> None:
        """Raise with the install hint when there is no Vulkan device (probed once per process)."""
        if not self.probed:
            self.adapter_info()
            self.probed = True

    def note_dawn_log(self, log: str) -> None:
        """Remember the adapter Dawn reports in a compile log ("Selected adapter: ...")."""
        m = re.search(r"Selected adapter: (.*)", log)
        if m:
            self.dawn_adapter = m.group(1).strip()


# One per process: the Vulkan loader's environment and LiteRT's WebGPU instance are process-wide.
VULKAN = VulkanDriver()


def use_software_vulkan(root: Path | None = None, *, force: bool = False) -> dict[str, str]:
    """``VULKAN.use_software_vulkan``: call it before creating a ``CompiledModel`` yourself."""
    return VULKAN.use_software_vulkan(root, force=force)


def adapter_info(*, refresh: bool = False) -> dict[str, Any]:
    """``VULKAN.adapter_info``: the Vulkan adapters this process can use (see there)."""
    return VULKAN.adapter_info(refresh=refresh)
