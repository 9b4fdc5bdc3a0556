"""sparselite: gradual pruning and int8 QAT in Lightning, exported to sparse int8 TFLite.

The public names load on first use: importing litert-torch takes seconds and prints native log
lines, which a CLI that only reports bad input should not pay for.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from sparselite.compat.torchvision import allow_torchvision_without_ops
from sparselite.errors import SparseliteError

# Before Lightning (through torchmetrics) can import torchvision; see compat/torchvision.py.
allow_torchvision_without_ops()

_PUBLIC = {
    "ChannelPruning": "sparselite.pruning.channel_callback",
    "Distillation": "sparselite.distillation.callback",
    "ExportOptions": "sparselite.export.options",
    "ExportReport": "sparselite.export.report",
    "GradualPruning": "sparselite.pruning.callback",
    "LiteRTModel": "sparselite.runtime.litert",
    "QuantizationAwareTraining": "sparselite.quantization.callback",
    "TFLiteExport": "sparselite.export.callback",
    "export_tflite": "sparselite.export.tflite",
}

__all__ = sorted([*_PUBLIC, "SparseliteError"])
__version__ = "0.1.0"

if TYPE_CHECKING:
    from sparselite.distillation.callback import Distillation
    from sparselite.export.callback import TFLiteExport
    from sparselite.pruning.channel_callback import ChannelPruning
    from sparselite.export.options import ExportOptions
    from sparselite.export.report import ExportReport
    from sparselite.export.tflite import export_tflite
    from sparselite.pruning.callback import GradualPruning
    from sparselite.quantization.callback import QuantizationAwareTraining
    from sparselite.runtime.litert import LiteRTModel


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sparselite' has no attribute {name!r}")
