"""sparselite: gradual pruning and int8 QAT in Lightning, exported to sparse int8 TFLite."""

from sparselite.errors import SparseliteError
from sparselite.export.callback import TFLiteExport
from sparselite.export.report import ExportReport
from sparselite.export.tflite import export_tflite
from sparselite.pruning.callback import GradualPruning
from sparselite.quantization.callback import QuantizationAwareTraining
from sparselite.runtime.litert import LiteRTModel

__all__ = [
    "ExportReport",
    "GradualPruning",
    "LiteRTModel",
    "QuantizationAwareTraining",
    "SparseliteError",
    "TFLiteExport",
    "export_tflite",
]
__version__ = "0.1.0"
