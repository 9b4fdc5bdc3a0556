"""What is inside a .tflite: constant tensors (sparsity, storage, bytes), ops, and what XNNPACK takes.

``inspect_tflite(path)`` reads the flatbuffer (dense or sparse-encoded weights alike), loads the file
once with XNNPACK to see which ops the delegate takes, and compresses the file with xz (and zstd when
the ``zstandard`` package is installed), since for download size a compressed dense file is the
number to beat.
"""

from __future__ import annotations

import lzma
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from sparselite.errors import SparseliteError
from sparselite.runtime.litert import xnnpack_delegated_ops
from sparselite.runtime.load_probe import check_loads
from sparselite.tflite.flatbuffer import (
    WEIGHT_INPUT, builtin_code, builtin_name, read_model, tensor_name, tensor_type_name,
)
from sparselite.tflite.constant_values import describe_layout, sparse_payload_bytes, tensor_values
from sparselite.tflite.ops import op_precision


@dataclass(frozen=True)
class ConstantTensor:
    name: str
    op: str  # the op(s) reading it; "DENSIFY>CONV_2D" when read through a DENSIFY
    dtype: str
    shape: tuple[int, ...]
    sparsity: float  # fraction of exact zeros in the dense value
    encoding: str  # "dense" | "csr" | "block_csr 1x16"
    index_dtype: str  # "-" when dense
    dense_bytes: int
    stored_bytes: int  # buffer plus index vectors


@dataclass(frozen=True)
class OpInfo:
    index: int
    op: str
    xnnpack: bool | None  # taken by the XNNPACK delegate (None: XNNPACK could not load the file)
    precision: str = ""  # int8, dynamic_int8 (int8 weights, float input), fp16 or fp32 weights; an op
    # without weights: the type it computes in; QUANTIZE/DEQUANTIZE: the border they make


@dataclass
class InspectReport:
    path: str
    file_bytes: int
    xz_bytes: int
    zstd_bytes: int | None  # None when the zstandard package is not installed
    tensors: list[ConstantTensor] = field(default_factory=list)
    ops: list[OpInfo] = field(default_factory=list)
    xnnpack_error: str | None = None  # why XNNPACK could not load the file, if it could not

    @property
    def constant_bytes(self) -> int:
        return sum(t.stored_bytes for t in self.tensors)

    @property
    def dense_constant_bytes(self) -> int:
        return sum(t.dense_bytes for t in self.tensors)

    @property
    def xnnpack_ops(self) -> int:
        return sum(1 for op in self.ops if op.xnnpack)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(
            constant_bytes=self.constant_bytes,
            dense_constant_bytes=self.dense_constant_bytes,
            xnnpack_ops=self.xnnpack_ops,
        )
        return data

    def format_table(self) -> str:
        rows = [("tensor", "op", "dtype", "shape", "sparsity", "encoding", "index", "dense B", "stored B")]
        for t in self.tensors:
            name = t.name if len(t.name) <= 48 else "…" + t.name[-47:]
            rows.append((name, t.op, t.dtype, "x".join(map(str, t.shape)) or "scalar", f"{t.sparsity:.1%}",
                         t.encoding, t.index_dtype, str(t.dense_bytes), str(t.stored_bytes)))
        rows.append(("total", "", "", "", "", "", "", str(self.dense_constant_bytes), str(self.constant_bytes)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        lines.append("")
        if self.xnnpack_error:
            lines.append(f"ops: {len(self.ops)}; XNNPACK could not load the file: {self.xnnpack_error}")
        else:
            lines.append(f"ops: {len(self.ops)}, XNNPACK takes {self.xnnpack_ops}")
        for op in self.ops:
            where = "?" if op.xnnpack is None else ("xnnpack" if op.xnnpack else "builtin")
            lines.append(f"  {op.index:3d}  {op.op:24s} {where:8s} {op.precision}")
        sizes = f"file: {self.file_bytes} B, xz -9: {self.xz_bytes} B"
        if self.zstd_bytes is not None:
            sizes += f", zstd -19: {self.zstd_bytes} B"
        lines.append(sizes)
        return "\n".join(lines)


def inspect_tflite(path: str | Path) -> InspectReport:
    """Per-tensor storage, op list and compressed sizes of a .tflite. Raises SparseliteError if the
    file is missing or not a valid TFLite flatbuffer."""
    path = Path(path)
    if not path.is_file():
        raise SparseliteError(f"{path} does not exist or is not a file")
    data = path.read_bytes()
    model = read_model(path)  # the path, not the bytes, so a corrupt file is named in the error
    check_loads(path)  # before XNNPACK loads it here: a native crash ends in the probe's child
    report = InspectReport(path=str(path), file_bytes=len(data), xz_bytes=len(lzma.compress(data, preset=9)),
                           zstd_bytes=_zstd_size(data))
    graph = model.subgraphs[0]
    try:
        report.tensors = _constant_tensors(model, graph)
    except (ValueError, IndexError) as err:  # a buffer or sparse index that doesn't match its tensor
        raise SparseliteError(f"{path} has a constant tensor that does not decode ({err}); re-export it") from None
    delegated, report.xnnpack_error = xnnpack_delegated_ops(data)
    producers = {int(t): op for op in graph.operators for t in op.outputs}
    report.ops = [
        OpInfo(index=i, op=builtin_name(builtin_code(model, op)), xnnpack=None if delegated is None else i in delegated,
               precision=op_precision(model, graph, op, producers))
        for i, op in enumerate(graph.operators)
    ]
    return report


def precision_summary(path: str | Path) -> str:
    """The precisions of a file's weight ops, counted: 'int8 14', 'dynamic_int8 24, fp32 2'."""
    model = read_model(path)
    graph = model.subgraphs[0]
    producers = {int(t): op for op in graph.operators for t in op.outputs}
    counts: dict[str, int] = {}
    for op in graph.operators:
        if builtin_code(model, op) in WEIGHT_INPUT:
            precision = op_precision(model, graph, op, producers)
            counts[precision] = counts.get(precision, 0) + 1
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items(), key=lambda item: -item[1])) or "-"


def _zstd_size(data: bytes) -> int | None:
    try:
        import zstandard
    except ImportError:
        return None
    return len(zstandard.ZstdCompressor(level=19).compress(data))


def _constant_tensors(model: schema.ModelT, graph: schema.SubGraphT) -> list[ConstantTensor]:
    readers: dict[int, list[str]] = {}
    densified_by: dict[int, int] = {}
    ops = graph.operators or []
    for op in ops:
        if builtin_code(model, op) == schema.BuiltinOperator.DENSIFY:
            densified_by[int(op.outputs[0])] = int(op.inputs[0])
    for op in ops:
        name = builtin_name(builtin_code(model, op))
        for tensor_index in op.inputs if op.inputs is not None else []:
            tensor_index = int(tensor_index)
            if tensor_index in densified_by:
                readers.setdefault(densified_by[tensor_index], []).append(f"DENSIFY>{name}")
            elif name != "DENSIFY" and tensor_index >= 0:
                readers.setdefault(tensor_index, []).append(name)
    rows = []
    for index, tensor in enumerate(graph.tensors):
        values = tensor_values(model, tensor)
        buffer = model.buffers[tensor.buffer]
        if buffer.data is None or len(buffer.data) == 0:
            continue
        encoding, index_dtype = describe_layout(tensor)
        shape = tuple(int(s) for s in (tensor.shape if tensor.shape is not None else []))
        rows.append(ConstantTensor(
            name=tensor_name(tensor),
            op="/".join(dict.fromkeys(readers.get(index, []))) or "-",
            dtype=tensor_type_name(tensor.type),
            shape=shape,
            sparsity=float(np.mean(values == 0)) if values is not None and values.size else 0.0,
            encoding=encoding,
            index_dtype=index_dtype,
            dense_bytes=values.nbytes if values is not None else len(buffer.data),
            stored_bytes=sparse_payload_bytes(model, tensor),
        ))
    return rows
