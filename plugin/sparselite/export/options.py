"""``ExportOptions``: every option of an export, validated once, with one name everywhere.

``export_tflite``, ``export_from_loader``, the ``TFLiteExport`` callback and ``sparselite export`` all
take these options by the same names (the CLI spells ``min_agreement`` as ``--min-agreement``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, Mapping

from sparselite.errors import SparseliteError
from sparselite.export.auto_precision import DEFAULT_MAX_ACCURACY_DROP
from sparselite.export.precision import PrecisionSpec, check_precision
from sparselite.quantization.layer_precision import is_int8_file
from sparselite.export.report import FLOAT_FALLBACKS, FloatFallback

IO_DTYPES = ("float32", "int8")


@dataclass(frozen=True)
class ExportOptions:
    """How to export.

    Attributes:
        io_dtype: 'float32' (QUANTIZE/DEQUANTIZE inside the model) or 'int8' model inputs and outputs.
        sparse: store pruned weights in TFLite's sparse format where that saves bytes.
        verify_batches: how many held-out batches the file is checked on (XNNPACK against the torch
            model); None skips the check.
        calibration_batches: how many batches calibrate the ranges QAT did not learn (all of them, for
            a model trained without QAT).
        min_agreement: top-1 agreement with the torch model below which the export fails and writes
            nothing (``parity.gate_failure`` gives the whole rule).
        gpu_check: add a GPU compatibility report (LiteRT's GPU accelerator, compiled GPU-only).
        require_gpu: fail unless every op runs on the GPU accelerator (implies dense weight storage:
            the accelerator has no DENSIFY).
        float_fallback: False: an op with no int8 TFLite kernel fails the export, named with its torch
            modules; True: such ops stay float in a mixed-precision file, listed in the report;
            'xnnpack': also keep float the modules whose int8 ops XNNPACK does not delegate.
        precision: None (the default): what QAT simulated (``QuantizationAwareTraining(precision=...)``),
            else 'int8'. Or 'int8' (the fully int8 file), 'dynamic_int8', 'fp16', 'fp32', 'auto' (each layer's
            precision chosen from measured latency within ``max_accuracy_drop``, ``auto_precision.py``;
            needs verification batches), or a mapping from module-name regexes to 'dynamic_int8',
            'fp16' or 'fp32' with a 'default' entry (``precision.py``).
        max_accuracy_drop: precision='auto': the top-1 points the file may lose against the float model
            on the verification batches.
    """

    io_dtype: Literal["float32", "int8"] = "float32"
    sparse: bool = True
    verify_batches: int | None = 8
    calibration_batches: int = 8
    min_agreement: float = 0.98
    gpu_check: bool = False
    require_gpu: bool = False
    float_fallback: FloatFallback = False
    precision: PrecisionSpec | None = None
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP

    def __post_init__(self) -> None:
        if self.io_dtype not in IO_DTYPES:
            raise SparseliteError(f"io_dtype={self.io_dtype!r} must be 'float32' or 'int8'")
        for name in ("sparse", "gpu_check", "require_gpu"):
            if not isinstance(getattr(self, name), bool):
                raise SparseliteError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.verify_batches is not None and not _is_count(self.verify_batches, minimum=1):
            raise SparseliteError(f"verify_batches={_shown(self.verify_batches)} must be a whole number >= 1, or None to "
                                  "skip the parity check (the batches themselves go in verify_data)")
        if not _is_count(self.calibration_batches, minimum=0):
            raise SparseliteError(f"calibration_batches={_shown(self.calibration_batches)} must be a whole number >= 0 "
                                  "(the batches themselves go in calibration_data)")
        if isinstance(self.min_agreement, bool) or not isinstance(self.min_agreement, (int, float)) \
                or not 0.0 <= self.min_agreement <= 1.0:
            raise SparseliteError(f"min_agreement={self.min_agreement!r} must be a number in [0, 1]")
        if not any(self.float_fallback is value or self.float_fallback == value and isinstance(value, str)
                   for value in FLOAT_FALLBACKS):
            raise SparseliteError(f"float_fallback={self.float_fallback!r} must be false, true or 'xnnpack'")
        if self.precision is not None:
            check_precision(self.precision)
        if isinstance(self.max_accuracy_drop, bool) or not isinstance(self.max_accuracy_drop, (int, float)) \
                or not 0.0 <= self.max_accuracy_drop <= 100.0:
            raise SparseliteError(f"max_accuracy_drop={self.max_accuracy_drop!r} must be a number of top-1 points in [0, 100]")
        if self.precision == "auto" and self.verify_batches is None:
            raise SparseliteError("precision='auto' measures accuracy on the verification batches; set verify_batches "
                                  "(the default is 8) and pass verify_data")
        if not self.int8_file and self.io_dtype != "float32":
            raise SparseliteError(f"io_dtype='int8' needs precision='int8' (a file with float layers has float inputs "
                                  f"and outputs), not precision={self.precision!r}")

    def with_choice(self, choice: Mapping[str, Any]) -> ExportOptions:
        """These options with the precision ``precision="auto"`` chose (``PrecisionChoice.to_dict()``, as the
        report and the checkpoint keep it): its explicit precision, and, for the fully int8 file, float
        kept where XNNPACK lacks int8 kernels, as auto measured it."""
        int8 = is_int8_file(choice["precision"])
        return replace(self, precision=choice["precision"], float_fallback=self.float_fallback or ("xnnpack" if int8 else False))

    @property
    def int8_file(self) -> bool:
        """The int8 route: the fully int8 file, or one whose precision mapping keeps some layers float-activation."""
        return is_int8_file(self.precision)  # None is resolved at export (``stages.prepare``)

    @property
    def verifies(self) -> bool:
        return self.verify_batches is not None

    @property
    def sparse_storage(self) -> bool:
        """Sparse encoding runs unless the file must run on the GPU accelerator, which has no DENSIFY."""
        return self.sparse and not self.require_gpu

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def build(cls, options: ExportOptions | None = None, keywords: Mapping[str, Any] | None = None) -> ExportOptions:
        """``options`` with ``keywords`` (option names) set on top; an unknown name is refused."""
        keywords = dict(keywords or {})
        unknown = sorted(set(keywords) - set(cls.names()))
        if unknown:
            raise SparseliteError(f"unknown export option(s) {unknown}; the options are {list(cls.names())}")
        base = (options or cls()).to_dict()
        return cls(**(base | keywords))


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, (int, float, str, type(None))) else f"<a {type(value).__name__}>"


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
