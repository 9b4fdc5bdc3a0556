"""Read and write TFLite flatbuffers through LiteRT's own schema module (no hand-rolled parsing)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import flatbuffers
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


def write_model(model: schema.ModelT) -> bytes:
    """Pack the object API back into .tflite bytes."""
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=_FILE_IDENTIFIER)
    return bytes(builder.Output())


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


def write_atomically(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: an old file is never half overwritten."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
