"""Network architectures of the models that meshserve trains itself, shared by the builder that
trains them and the runtime that serves them (so the two can never disagree on a layer)."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 grayscale digits: three 3x3 conv blocks, two poolings, one linear layer.
    About 25k parameters; input [batch, 1, 8, 8] normalized pixels, output [batch, 10] logits."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 2x2
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(64 * 2 * 2, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(pixels).flatten(1)))


ARCHITECTURES = {"digits_cnn": DigitsCNN}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention-masked mean over tokens (sentence-transformers' Pooling): [b, t, d] -> [b, d]."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
