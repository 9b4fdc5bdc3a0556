"""Read and write TFLite flatbuffers through LiteRT's own schema module (no hand-rolled parsing)."""

from __future__ import annotations

import errno
import glob
import os
import tempfile
from pathlib import Path

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from sparselite.errors import SparseliteError
from sparselite.tflite.validate import validate_model

_FILE_IDENTIFIER = b"TFL3"


# Ops whose constant weight is an input, and its slot (the bias, where there is one, is the next slot).
WEIGHT_INPUT = {
    schema.BuiltinOperator.CONV_2D: 1,
    schema.BuiltinOperator.DEPTHWISE_CONV_2D: 1,
    schema.BuiltinOperator.FULLY_CONNECTED: 1,
}


def read_model(source: bytes | str | Path) -> schema.ModelT:
    """Unpack a .tflite file (path or bytes) into the mutable object API, or raise a clear error.

    Every file is checked as untrusted (``validate.validate_model``): indices, sizes and sparse
    structures in range, so what this returns is also safe to hand to LiteRT.
    """
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
    name = str(source) if isinstance(source, (str, Path)) else "the model bytes"
    if len(data) < 8 or data[4:8] != _FILE_IDENTIFIER:
        raise SparseliteError(f"{name} is not a TFLite flatbuffer (no 'TFL3' identifier); re-export it")
    root = int.from_bytes(data[:4], "little")
    if root < 8 or root + 4 > len(data):
        raise SparseliteError(f"{name} is a corrupt TFLite flatbuffer (its root offset points outside the file); re-export it")
    try:
        model = schema.ModelT.InitFromPackedBuf(data, 0)
    except Exception as err:  # the generated code raises whatever the corrupt offsets lead to
        raise SparseliteError(f"{name} is a corrupt TFLite flatbuffer ({type(err).__name__}); re-export it") from None
    validate_model(model, len(data), name)
    return model


def is_tflite_file(path: str | Path) -> bool:
    """Whether ``path`` is a file that starts like a TFLite flatbuffer (the 'TFL3' identifier)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return len(head) == 8 and head[4:8] == _FILE_IDENTIFIER


def write_model(model: schema.ModelT) -> bytes:
    """Pack the object API back into .tflite bytes."""
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=_FILE_IDENTIFIER)
    return bytes(builder.Output())


def append_tensor(model: schema.ModelT, shape, tensor_type: int, name: bytes,
                  quantization: schema.QuantizationParametersT | None = None, data: bytes | None = None) -> int:
    """A new tensor in the first subgraph, with a buffer of its own (holding ``data`` for a constant);
    returns its index. The name gets a numbered suffix where the subgraph already has it: tools that key
    tensors by name (ai-edge-quantizer) refuse a file with a repeated one."""
    buffer = schema.BufferT()
    if data is not None:
        buffer.data = np.frombuffer(data, dtype=np.uint8)
    model.buffers.append(buffer)
    tensor = schema.TensorT()
    tensor.shape = np.array(shape, dtype=np.int32)
    tensor.type = tensor_type
    tensor.quantization = quantization
    tensor.buffer = len(model.buffers) - 1
    tensor.name = _unused_name(model.subgraphs[0], name)
    model.subgraphs[0].tensors.append(tensor)
    return len(model.subgraphs[0].tensors) - 1


def _unused_name(subgraph: schema.SubGraphT, name: bytes) -> bytes:
    taken = {t.name for t in subgraph.tensors}
    if name not in taken:
        return name
    return next(candidate for n in range(1, len(taken) + 2) if (candidate := name + b"_%d" % n) not in taken)


def builtin_code(model: schema.ModelT, op: schema.OperatorT) -> int:
    """The BuiltinOperator of an op (newer files carry it in builtinCode, older ones in the deprecated byte)."""
    code = model.operatorCodes[op.opcodeIndex]
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def operator_code_index(model: schema.ModelT, builtin: int) -> int:
    """Index of ``builtin`` in the model's operator codes, appended (version 1) when absent."""
    for index, existing in enumerate(model.operatorCodes):
        if max(existing.builtinCode, existing.deprecatedBuiltinCode) == builtin:
            return index
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def builtin_name(code: int) -> str:
    """``CONV_2D`` for ``BuiltinOperator.CONV_2D``."""
    return _BUILTIN_NAMES.get(code, f"OP_{code}")


def tensor_name(tensor: schema.TensorT) -> str:
    """A tensor's name as text (the object API keeps it as bytes)."""
    name = tensor.name
    if name is None:
        return ""
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


def tensor_type_name(code: int) -> str:
    """``int8`` for ``TensorType.INT8``."""
    return _TYPE_NAMES.get(code, str(code))


_BUILTIN_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_TYPE_NAMES = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}


TEMP_SUFFIX = ".tmp"


def temp_prefix(path: Path) -> str:
    """Temp files for ``path`` are ``.<name>.<pid>.<random>.tmp`` in its folder: recognizable, and the
    pid says whether their writer is still alive."""
    return f".{path.name}."


def write_atomically(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: an old file is never half overwritten.

    The file gets the mode a plain ``open`` would give (0666 less the umask; ``mkstemp`` alone gives
    0600). Temp files that a killed writer left for the same target are removed first. A full disk or
    a read-only folder is one ``SparseliteError`` line; nothing at ``path`` is touched then.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path)
        fd, tmp = tempfile.mkstemp(prefix=f"{temp_prefix(path)}{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as err:
        raise SparseliteError(f"cannot write {path}: {err.strerror or err}; nothing was replaced") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno in _NO_ROOM:
            raise SparseliteError(f"cannot write {path}: {err.strerror}; nothing was replaced") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def current_umask() -> int:
    """The process umask (reading it means setting it; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Remove ``write_atomically`` temp files for ``path`` whose writing process no longer runs (a kill -9
    mid-write leaves one). Returns what was removed."""
    removed = []
    for candidate in path.parent.glob(f"{glob.escape(temp_prefix(path))}*{TEMP_SUFFIX}"):
        pid = candidate.name[len(temp_prefix(path)):].split(".", 1)[0]
        if pid.isdigit() and _process_alive(int(pid)):
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
