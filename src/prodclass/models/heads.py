"""Classifier heads and the backbone + head model.

``MLPHead`` is the reference projects' head: Dense 256 → ReLU → Dropout 0.4 → Dense
(num_classes) (the softmax is applied at prediction, training uses logits with
cross-entropy). ``LinearHead`` is a (optionally dropout-regularised) multinomial logistic
regression on the embedding.
"""

from __future__ import annotations

import torch
from torch import nn


class MLPHead(nn.Module):
    """``(B, in_dim)`` embeddings → ``(B, num_classes)`` logits through one hidden layer."""

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.4):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden_dim, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LinearHead(nn.Module):
    """``(B, in_dim)`` embeddings → ``(B, num_classes)`` logits, one affine map."""

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def create_head(kind: str, in_dim: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.4) -> nn.Module:
    """Build a head by config name (``mlp`` or ``linear``)."""
    if kind == "mlp":
        return MLPHead(in_dim, num_classes, hidden_dim, dropout)
    if kind == "linear":
        return LinearHead(in_dim, num_classes, dropout)
    raise ValueError(f"unknown head {kind!r} (expected 'mlp' or 'linear')")


class Classifier(nn.Module):
    """Backbone + head: ``(B, 3, H, W)`` preprocessed images → ``(B, num_classes)`` logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
