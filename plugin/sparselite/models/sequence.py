"""Sequence classifiers over Fashion-MNIST rows: the Conv1d and recurrent families, bundled as examples.

An image's 28 rows are read as 28 time steps of 28 features, so the same data serves models whose
layers users bring from speech and sensor work: keyword-spotting Conv1d stacks and GRUs.
"""

from __future__ import annotations

import torch
from torch import nn


class KeywordSpotter(nn.Module):
    """A Conv1d keyword-spotting net over [N, features, time] (28 MFCC-like rows of an image here)."""

    def __init__(self, features: int = 28, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(features, 32, 3, padding=1, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Conv1d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Conv1d(32, 48, 1, bias=False), nn.BatchNorm1d(48), nn.ReLU(),
        )
        self.classifier = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x.flatten(1, 2)).mean(-1))


class GRUClassifier(nn.Module):
    """Reads an image row by row with a GRU and classifies its last hidden state."""

    def __init__(self, features: int = 28, hidden: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.gru(x.flatten(1, 2))
        return self.head(output[:, -1])
