"""Where an export goes: checked before the export's minutes of work, written as one unit after.

``check_destination`` refuses, with one line, an output that would overwrite something other than a
model (a folder, a JSON file, a file that is not a .tflite) or that cannot be written (a read-only
folder, a path under a file, a disk without room for the file), before anything is traced or converted.

``write_model_and_report`` writes the model and its JSON report so that a kill at any moment leaves
either the old pair, or the new model without a report, or the new pair; never a new model next to
the old report. The report carries the model's sha256, so a pair can be checked later
(``report_matches``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from sparselite.errors import SparseliteError
from sparselite.tflite.flatbuffer import is_tflite_file, remove_stale_temp_files, temp_prefix, write_atomically

MODEL_SUFFIX = ".tflite"


def check_destination(path: str | Path, report: str | Path | None = None, needed_bytes: int = 0) -> Path:
    """``path`` as a Path, or ``SparseliteError`` if the model (or its report) cannot or must not go there,
    or if its folder has less than ``needed_bytes`` free (a bound on the file's size; see ``size_bound``)."""
    path = Path(path)
    if path.suffix != MODEL_SUFFIX:
        raise SparseliteError(f"output {path} must end in {MODEL_SUFFIX} (the report goes next to it as .json)")
    if path.is_dir():
        raise SparseliteError(f"output {path} is a folder; give a file name such as {path / 'model.tflite'}")
    if path.exists() and not is_tflite_file(path):
        raise SparseliteError(f"output {path} exists and is not a .tflite model; refusing to overwrite it")
    if report is not None:
        report = Path(report)
        if report.is_dir() or (report.exists() and not _is_export_report(report)):
            raise SparseliteError(f"{report} exists and is not a sparselite export report; move it, or choose "
                                  "another output name")
    folder = path.parent
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise SparseliteError(f"cannot write {path}: {parent} is a file, not a folder")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path)
        if report is not None:
            remove_stale_temp_files(report)
        # A real write, not os.access: read-only mounts, ACLs and quotas all show up here.
        with tempfile.NamedTemporaryFile(prefix=f"{temp_prefix(path)}{os.getpid()}.", suffix=".tmp", dir=folder) as f:
            f.write(b"\0")
            f.flush()
        free = shutil.disk_usage(folder).free
    except OSError as err:
        raise SparseliteError(f"cannot write {path}: {err.strerror or err}; choose a writable output folder") from None
    if free < needed_bytes:
        raise SparseliteError(f"not enough room for {path}: {free / 2**20:.1f} MiB free in {folder}, and the export "
                              f"may need up to {needed_bytes / 2**20:.1f} MiB; free some space or choose another folder")
    return path


def size_bound(model) -> int:
    """An upper bound on the bytes of ``model``'s exported file: every parameter and buffer as float32 (a
    mixed file may keep some float; int8 weights take a quarter of that), plus 1 MiB for the graph, the
    quantization tables and the report. The old file stays until the new one replaces it, so the folder's
    free space must hold all of the new one."""
    tensors = [*model.parameters(), *model.buffers()]
    return 4 * sum(t.numel() for t in tensors) + (1 << 20)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_model_and_report(path: str | Path, data: bytes, report_json: bytes, report: str | Path) -> None:
    """Replace the model and its report as one unit: the old report goes first, then the model, then the
    new report. A kill in between leaves a model without a report (never a mismatched pair)."""
    path, report = Path(path), Path(report)
    report.unlink(missing_ok=True)
    write_atomically(path, data)
    write_atomically(report, report_json)


def report_matches(path: str | Path, report: str | Path) -> bool:
    """Whether ``report`` describes the file at ``path`` byte for byte (its sha256)."""
    try:
        recorded = json.loads(Path(report).read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return False
    return recorded == sha256_hex(Path(path).read_bytes())


def _is_export_report(path: Path) -> bool:
    try:
        if path.stat().st_size > 16 << 20:
            return False
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"path", "file_bytes", "io_dtype"} <= set(data)
