"""The sparse layouts sparselite writes, their exact cost in bytes, and the encoder (pure numpy).

The format is described in ``sparselite.tflite.constant_values``. What is written here: identity traversal
order; optionally 1xb blocks (b = 2..32, dividing the dim) along the last dim (the input-channel dim
of conv OHWI and FC [O, I], the channel dim of depthwise [1, kh, kw, C]); each tensor dim DENSE or
SPARSE_CSR, block dims DENSE (the runtime's FormatConverter reads block sizes from dense_size, which
the interpreter copies for DENSE dims only: a CSR block dim dies with SIGFPE in allocate_tensors).
For a weight, the cost of each layout is its exact payload (values, including zeros inside kept
blocks, plus every index vector at the narrowest of uint8/uint16/int32 that fits it). 1x2 blocks
matter for unstructured sparsity on 512-wide inputs: they halve the index range so indices fit uint8.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from sparselite.errors import SparseliteError

_BLOCK_SIZES = (2, 4, 8, 16, 32)
_INDEX_TYPES = (  # (union tag, dtype, schema vector class), narrowest first
    (schema.SparseIndexVector.Uint8Vector, np.uint8, schema.Uint8VectorT),
    (schema.SparseIndexVector.Uint16Vector, np.uint16, schema.Uint16VectorT),
    (schema.SparseIndexVector.Int32Vector, np.int32, schema.Int32VectorT),
)


@dataclass(frozen=True)
class Layout:
    """Identity traversal order; the last dim optionally split into (size/block, block), the block
    dim traversed last; ``csr`` says, per level, SPARSE_CSR (True) or DENSE."""

    block: int  # length of the block along the last dim (1 = not blocked)
    csr: tuple[bool, ...]  # one per level: the tensor dims, then the block dim (always DENSE) when block > 1

    @property
    def name(self) -> str:
        return "csr" if self.block == 1 else f"block_csr 1x{self.block}"


def index_dtype_for(max_value: int) -> type:
    """Narrowest index type that holds ``max_value``."""
    for _, dtype, _ in _INDEX_TYPES:
        if max_value <= np.iinfo(dtype).max:
            return dtype
    raise SparseliteError(f"sparse index {max_value} does not fit int32; the tensor is too large to encode")


def _levels(shape: tuple[int, ...], block: int) -> tuple[int, ...]:
    return tuple(shape[:-1]) + ((shape[-1] // block, block) if block > 1 else (shape[-1],))


def _kept_counts(weights: np.ndarray, block: int) -> list[int]:
    """Per level: how many prefixes (coordinates down to that level) have a non-zero below them."""
    nonzero = weights.reshape(_levels(weights.shape, block)) != 0
    counts = [int(nonzero.sum())]
    for axis in range(nonzero.ndim - 1, 0, -1):
        nonzero = nonzero.any(axis=axis)
        counts.append(int(nonzero.sum()))
    return counts[::-1]


def _layout_bytes(sizes: tuple[int, ...], counts: list[int], csr: tuple[bool, ...], itemsize: int) -> int:
    """Exact payload bytes (values + index vectors) of a layout, from the kept counts alone.

    A CSR level keeps exactly the prefixes with a non-zero below (their parents are then kept too);
    a DENSE level multiplies the positions of the level above by its size.
    """
    total, positions = 0, 1
    for size, kept, is_csr in zip(sizes, counts, csr):
        if is_csr:
            total += (positions + 1) * np.dtype(index_dtype_for(kept)).itemsize  # segments
            total += kept * np.dtype(index_dtype_for(size - 1)).itemsize  # indices
            positions = kept
        else:
            positions *= size
    return total + positions * itemsize


def candidate_layouts(shape: tuple[int, ...]) -> list[Layout]:
    """Every layout this encoder can write for a tensor of ``shape``."""
    # Blocks save indices when zeros come in runs (1x4, 1x16 pruning); 1x2 also halves the index
    # range, so a 512-wide dim gets uint8 indices. Block dims must be DENSE: the runtime's
    # FormatConverter takes block sizes from dense_size, which it reads for DENSE dims only
    # (a CSR block dim crashes the interpreter with SIGFPE at allocate_tensors).
    blocks = [1] + [b for b in _BLOCK_SIZES if shape[-1] % b == 0 and shape[-1] > b]
    return [
        Layout(block, csr + ((False,) if block > 1 else ()))
        for block in blocks
        for csr in itertools.product((False, True), repeat=len(shape))
        if any(csr)
    ]


def best_layout(weights: np.ndarray, layouts: list[Layout], overhead: int) -> tuple[Layout | None, int]:
    """The layout with the fewest payload bytes, if that plus ``overhead`` beats dense; and its bytes."""
    best, best_bytes = None, weights.nbytes
    counts = {}
    for layout in layouts:
        if layout.block not in counts:
            counts[layout.block] = _kept_counts(weights, layout.block)
        size = _layout_bytes(_levels(weights.shape, layout.block), counts[layout.block], layout.csr, weights.itemsize)
        if size < best_bytes:
            best, best_bytes = layout, size
    if best is not None and best_bytes + overhead >= weights.nbytes:
        best = None
    return best, best_bytes


def _index_vector(values: np.ndarray) -> tuple[int, object, type]:
    dtype = index_dtype_for(int(values.max()) if values.size else 0)
    tag, _, cls = next(t for t in _INDEX_TYPES if t[1] is dtype)
    vector = cls()
    vector.values = values.astype(dtype)
    return tag, vector, dtype


def encode_tensor(weights: np.ndarray, layout: Layout) -> tuple[np.ndarray, schema.SparsityParametersT, list[type]]:
    """Values (in traversal order), SparsityParameters and index dtypes of ``weights`` stored as ``layout``."""
    n = weights.ndim
    sizes = _levels(weights.shape, layout.block)
    expanded = weights.reshape(sizes)
    nonzero = expanded != 0
    positions = np.zeros((1, 0), dtype=np.int64)  # coordinates of each kept prefix, in level order
    metadata, dtypes = [], []
    for level, size in enumerate(sizes):
        children = np.concatenate(
            [np.repeat(positions, size, axis=0), np.tile(np.arange(size), len(positions))[:, None]], axis=1
        )
        dim = schema.DimensionMetadataT()
        dim.denseSize = size  # read for block dims whatever their format (TFLite's FormatConverter)
        if layout.csr[level]:
            below = tuple(range(level + 1, len(sizes)))
            keep = (nonzero.any(axis=below) if below else nonzero)[tuple(children.T)]
            segments = np.concatenate([[0], np.cumsum(keep.reshape(len(positions), size).sum(axis=1))])
            dim.format = schema.DimensionType.SPARSE_CSR
            dim.arraySegmentsType, dim.arraySegments, seg_dtype = _index_vector(segments)
            dim.arrayIndicesType, dim.arrayIndices, idx_dtype = _index_vector(children[keep, level])
            dtypes += [seg_dtype, idx_dtype]
            positions = children[keep]
        else:
            dim.format = schema.DimensionType.DENSE
            positions = children
        metadata.append(dim)
    params = schema.SparsityParametersT()
    params.traversalOrder = list(range(len(sizes)))
    params.blockMap = [n - 1] if layout.block > 1 else None
    params.dimMetadata = metadata
    return expanded[tuple(positions.T)], params, dtypes
