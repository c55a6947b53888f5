"""The Classifier cut at a block boundary: a frozen prefix and a trainable tail.

``blocks = model.backbone.blocks`` lists the backbone's stages input-to-output (for
EfficientNet-Lite: stem, 7 block stages, head conv). Cutting before block ``k`` gives

* the **prefix**, blocks ``[:k]``: float32 ``(B, 3, S, S)`` images → ``(B, C_k, H_k, W_k)``
  activations (EfficientNet-Lite0 at 224 px, ``k = 6``: ``(B, 112, 14, 14)``);
* the **tail**, blocks ``[k:]`` + pooling + the classifier head: those activations →
  ``(B, num_classes)`` logits.

``tail_forward(m, prefix_forward(m, x, k), k) == m(x)`` for every ``k`` in ``0..len(blocks)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Apply backbone blocks in order (a ``ModuleList`` entry such as the stem applies its parts in turn)."""
    for b in blocks:
        for m in b if isinstance(b, nn.ModuleList) else (b,):
            x = m(x)
    return x


def prefix_forward(model, x: torch.Tensor, k: int) -> torch.Tensor:
    """Frozen part of a :class:`prodclass.models.heads.Classifier`: ``(B, 3, S, S)`` images →
    activations entering block ``k``."""
    return run_blocks(model.backbone.blocks[:k], x)


def tail_forward(model, h: torch.Tensor, k: int) -> torch.Tensor:
    """Trainable part: activations entering block ``k`` → ``(B, C)`` logits."""
    bb = model.backbone
    return model.head(bb.model.forward_head(run_blocks(bb.blocks[k:], h), pre_logits=True))


class Prefix(nn.Module):
    """Blocks ``[:k]`` of ``model`` as a module (what is exported to ONNX for the feature cache).

    Holds ``model`` as a submodule: wrapping does not copy it.
    """

    def __init__(self, model: nn.Module, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return prefix_forward(self.model, x, self.k)


class Tail(nn.Module):
    """Blocks ``[k:]`` + head of ``model`` as a module: what stage 2 trains and validates.

    Holds ``model`` as a submodule (same parameters, no copy), so an optimizer or
    ``AveragedModel`` over ``model``'s parameters and one over the tail's see the same tensors;
    ``Tail(...).model`` of a deep copy is the copied Classifier.
    """

    def __init__(self, model: nn.Module, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return tail_forward(self.model, h, self.k)
