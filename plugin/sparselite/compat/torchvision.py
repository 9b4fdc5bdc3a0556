"""Let ``import torchvision`` work next to the CPU build of torch 2.13 when its C++ ops cannot load.

The torchvision 0.28 wheel on PyPI is built against CUDA torch. Next to the CPU torch that
litert-torch pins, its ``_C`` extension fails to load (torchvision handles that: ``_has_ops()`` is
False), but ``torchvision/_meta_registrations.py`` then registers fake kernels for
``torchvision::nms`` and friends, which do not exist, and ``import torchvision`` raises. Lightning
imports torchmetrics, which imports torchvision if it is installed, so that breaks every command.

Those fake kernels exist only for torch.compile/export of detection ops (nms, roi_align, deform
conv); classification models never call them. So when the extension cannot load, the module is
replaced by an empty one before torchvision is imported. Repro: docs/upstream/torchvision_cpu_import.md.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

_META = "torchvision._meta_registrations"


def torchvision_ops_load() -> bool | None:
    """Whether torchvision's C++ extension loads next to this torch (None: torchvision is absent)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    import torch

    library = next(Path(spec.submodule_search_locations[0]).glob("_C*.so"), None)
    if library is None:
        return False
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError):
        return False
    return True


def allow_torchvision_without_ops() -> None:
    """Before anything imports torchvision: skip its meta registrations if its ops cannot load."""
    if "torchvision" in sys.modules or _META in sys.modules:
        return
    if torchvision_ops_load() is False:
        sys.modules[_META] = types.ModuleType(_META, "torchvision's fake kernels, skipped: its C++ ops did not load")
