"""Flatbuffer pass: equal quantization tables and vectors written once (lossless).

The object API writes every tensor's per-channel scales and int64 zero points separately: 12 bytes
per channel for the weight, 12 more for the bias, and the same again for a DENSIFY output. The zero
points are all zeros, so most of these vectors are equal; flatbuffers allow a table or vector to be
referenced from several places, and readers can't tell the difference. Runs on dense exports too,
so that dense and sparse files differ only by sparse storage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from sparselite.tflite.flatbuffer import read_model, write_model


class _PackCache:
    """Offsets already written into one flatbuffer builder, keyed by content."""

    def __init__(self):
        self.builder = None
        self.tables: dict[tuple, int] = {}
        self.vectors: dict[tuple, int] = {}

    def for_builder(self, builder) -> "_PackCache":
        if self.builder is not builder:
            self.builder, self.tables, self.vectors = builder, {}, {}
        return self


class _VectorSharingBuilder:
    """Forwards to a flatbuffers Builder, but writes each distinct numpy vector only once."""

    def __init__(self, builder, cache: _PackCache):
        self._builder, self._cache = builder, cache

    def __getattr__(self, name):
        return getattr(self._builder, name)

    def CreateNumpyVector(self, values):
        key = (values.dtype.str, values.shape, values.tobytes())
        if key not in self._cache.vectors:
            self._cache.vectors[key] = self._builder.CreateNumpyVector(values)
        return self._cache.vectors[key]


class _SharedQuantization:
    """QuantizationParameters packed so that equal tables and equal vectors are written once."""

    def __init__(self, table: schema.QuantizationParametersT, cache: _PackCache, by_content: bool):
        for field in ("min", "max", "scale", "zeroPoint"):  # lists would bypass CreateNumpyVector
            value = getattr(table, field)
            if value is not None and not isinstance(value, np.ndarray):
                setattr(table, field, np.asarray(value, dtype=np.int64 if field == "zeroPoint" else np.float32))
        self._table, self._cache, self._by_content = table, cache, by_content

    def __getattr__(self, name):  # reads (scale, zeroPoint, ...) go to the wrapped table
        return getattr(self.__dict__["_table"], name)

    def _key(self) -> tuple | None:
        table = self._table
        if not self._by_content:
            return ("same object", id(table))  # still one copy for a weight and its DENSIFY output
        if table.details is not None:
            return None
        arrays = tuple(None if v is None else (v.dtype.str, v.tobytes()) for v in (table.min, table.max, table.scale, table.zeroPoint))
        return arrays + (table.quantizedDimension,)

    def Pack(self, builder):
        cache = self._cache.for_builder(builder)
        key = self._key()
        if key is None:
            return self._table.Pack(builder)
        if key not in cache.tables:
            packer = _VectorSharingBuilder(builder, cache) if self._by_content else builder
            cache.tables[key] = self._table.Pack(packer)
        return cache.tables[key]


def share_quantization(model: schema.ModelT, by_content: bool = True) -> None:
    """Make ``write_model(model)`` write equal quantization tables and vectors once, in place.

    ``by_content=False`` shares only tables that are the same object (a weight and its DENSIFY output).
    """
    cache = _PackCache()
    wrapped: dict[int, _SharedQuantization] = {}
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            table = tensor.quantization
            if table is not None and not isinstance(table, _SharedQuantization):
                if id(table) not in wrapped:
                    wrapped[id(table)] = _SharedQuantization(table, cache, by_content)
                tensor.quantization = wrapped[id(table)]


def share_quantization_tables(data: bytes | str | Path) -> bytes:
    """The pass on .tflite bytes (or a path): new bytes with equal quantization tables written once."""
    model = read_model(data)
    share_quantization(model)
    return write_model(model)
