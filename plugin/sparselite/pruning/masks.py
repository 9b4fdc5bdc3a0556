"""Mask math: which weights a pattern removes for a given sparsity.

Patterns are expressed on the weight as TFLite lays it out, ``[out, kh, kw, in]`` flattened to 2-D
``[out, kh*kw*in]``, because that is the layout the sparse encoder and the sparse kernels see:
  - ``unstructured``: single weights;
  - ``RxC`` blocks (``1x4``, ``1x16``...): R output rows by C consecutive input channels;
  - ``N:M``: at most N non-zeros in every run of M consecutive input channels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from sparselite.errors import SparseliteError


@dataclass(frozen=True)
class Pattern:
    kind: str  # "unstructured" | "block" | "n:m"
    rows: int = 1
    cols: int = 1
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        spec = str(text).strip().lower()
        if spec == "unstructured":
            return cls("unstructured")
        if block := re.fullmatch(r"(\d+)x(\d+)", spec):
            rows, cols = int(block[1]), int(block[2])
            if rows < 1 or cols < 1:
                raise SparseliteError(f"pattern '{text}': block sides must be >= 1")
            return cls("unstructured") if rows == cols == 1 else cls("block", rows=rows, cols=cols)
        if nm := re.fullmatch(r"(\d+):(\d+)", spec):
            n, m = int(nm[1]), int(nm[2])
            if not 0 < n < m:
                raise SparseliteError(f"pattern '{text}': N:M needs 0 < N < M, e.g. 2:4")
            return cls("n:m", n=n, m=m)
        raise SparseliteError(f"unknown pruning pattern '{text}'; use 'unstructured', a block 'RxC' (e.g. 1x16) or 'N:M' (e.g. 2:4)")

    def __str__(self) -> str:
        return {"unstructured": "unstructured", "block": f"{self.rows}x{self.cols}", "n:m": f"{self.n}:{self.m}"}[self.kind]

    @property
    def max_sparsity(self) -> float:
        return (self.m - self.n) / self.m if self.kind == "n:m" else 1.0

    def check_fits(self, weight_shape: torch.Size, layer: str) -> None:
        """Reject at set-up a pattern that cannot tile this layer."""
        out_dim, in_dim = weight_shape[0], weight_shape[1]
        if self.kind == "block":
            if out_dim % self.rows or in_dim % self.cols:
                raise SparseliteError(
                    f"block {self} does not tile layer '{layer}' (out={out_dim}, in={in_dim}): both must divide; "
                    "exclude the layer or give it another pattern in `overrides`"
                )
        elif self.kind == "n:m" and in_dim % self.m:
            raise SparseliteError(
                f"{self} does not tile layer '{layer}': its {in_dim} input channels are not a multiple of {self.m}; "
                "exclude the layer or give it another pattern in `overrides`"
            )


def to_tflite_2d(weight: torch.Tensor) -> torch.Tensor:
    """[out, in, kh, kw], [out, in, k] (Conv1d, exported as a 1xk conv) or [out, in] -> [out, kh*kw*in], TFLite's OHWI order."""
    if weight.dim() == 4:
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    if weight.dim() == 3:
        return weight.permute(0, 2, 1).reshape(weight.shape[0], -1)
    return weight.reshape(weight.shape[0], -1)


def from_tflite_2d(matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if len(shape) == 4:
        out_c, in_c, kh, kw = shape
        return matrix.reshape(out_c, kh, kw, in_c).permute(0, 3, 1, 2).contiguous()
    if len(shape) == 3:
        out_c, in_c, k = shape
        return matrix.reshape(out_c, k, in_c).permute(0, 2, 1).contiguous()
    return matrix.reshape(shape)


def group_scores(weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """One score per prunable group: |w| for single weights, the mean |w| of a block or of an N:M slot."""
    magnitude = to_tflite_2d(weight.detach().abs().float())
    if pattern.kind == "block":
        rows, cols = magnitude.shape
        return (
            magnitude.reshape(rows // pattern.rows, pattern.rows, cols // pattern.cols, pattern.cols)
            .mean(dim=(1, 3))
            .flatten()
        )
    return magnitude.flatten()


def expand_group_mask(keep: torch.Tensor, weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Per-group keep flags -> a mask shaped like the weight."""
    rows, cols = to_tflite_2d(weight).shape
    if pattern.kind == "block":
        grid = keep.reshape(rows // pattern.rows, cols // pattern.cols)
        keep = grid.repeat_interleave(pattern.rows, 0).repeat_interleave(pattern.cols, 1)
    return from_tflite_2d(keep.reshape(rows, cols).to(weight.dtype), weight.shape)


def keep_top(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep flags that drop the ``round(sparsity * n)`` lowest scores (stable on ties, so masks only grow)."""
    n_drop = int(round(sparsity * scores.numel()))
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_drop > 0:
        order = torch.argsort(scores, stable=True)
        keep[order[:n_drop]] = False
    return keep


def n_m_candidates(weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Flags the M-N smallest weights in every run of M input channels: the only weights N:M may drop."""
    magnitude = to_tflite_2d(weight.detach().abs().float())
    runs = magnitude.reshape(-1, pattern.m)
    drop = torch.zeros_like(runs, dtype=torch.bool)
    drop.scatter_(1, torch.argsort(runs, dim=1, stable=True)[:, : pattern.m - pattern.n], True)
    return drop.flatten()


def layer_mask(weight: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """The mask of one layer pruned on its own (per-layer threshold)."""
    if pattern.kind == "n:m":
        # Ramp up inside the N:M structure: drop the smallest candidates first, N:M exactly at max sparsity.
        candidates = n_m_candidates(weight, pattern)
        scores = to_tflite_2d(weight.detach().abs().float()).flatten().masked_fill(~candidates, float("inf"))
        return expand_group_mask(keep_top(scores, min(sparsity, pattern.max_sparsity)), weight, pattern)
    return expand_group_mask(keep_top(group_scores(weight, pattern), sparsity), weight, pattern)


def global_masks(weights: dict[str, torch.Tensor], sparsity: float, pattern: Pattern) -> dict[str, torch.Tensor]:
    """Masks from one magnitude threshold shared by all layers (layers that matter more keep more)."""
    if pattern.kind == "n:m":  # N:M is a per-run constraint; a global threshold has nothing to choose
        return {name: layer_mask(w, sparsity, pattern) for name, w in weights.items()}
    scores = {name: group_scores(w, pattern) for name, w in weights.items()}
    keep = keep_top(torch.cat(list(scores.values())), sparsity)
    masks, start = {}, 0
    for name, weight in weights.items():
        count = scores[name].numel()
        masks[name] = expand_group_mask(keep[start : start + count], weight, pattern)
        start += count
    return masks
