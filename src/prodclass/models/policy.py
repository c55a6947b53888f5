"""The freezing policy of progressive fine-tuning, apart from any training loop.

Like Lightning's ``BackboneFinetuning`` callback, :class:`BackboneFinetuning` decides, for a
:class:`prodclass.models.heads.Classifier`:

* **which blocks train**: the head and the last ``unfreeze_blocks`` entries of
  :attr:`prodclass.features.backbones.Backbone.blocks` (``0`` = stage 1, head only);
* **BatchNorm modes**: BatchNorm layers of frozen blocks are always in eval mode (in train mode
  they would keep updating the running statistics of layers whose weights are frozen, the known
  fine-tuning pitfall); those of the unfrozen blocks too, unless ``bn_train``;
* **parameter groups**: discriminative learning rates (``backbone_lr`` for the unfrozen blocks,
  ``lr`` for the head), each split by :func:`timm.optim.param_groups_weight_decay` into a
  decayed group and one without decay for biases and other 1-D tensors (BatchNorm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prodclass import _torchvision  # noqa: F401  (must precede the timm import)

# isort: split
from timm.optim import param_groups_weight_decay


@dataclass(frozen=True)
class BackboneFinetuning:
    """Which part of a Classifier trains, in which mode, at which learning rate.

    Attributes:
        unfreeze_blocks: last N backbone blocks that train (``0``: head only).
        bn_train: BatchNorm layers of the unfrozen blocks in train mode.
        lr: peak learning rate of the head.
        backbone_lr: peak learning rate of the unfrozen blocks.
        weight_decay: AdamW decoupled decay of the tensors with more than one dimension.
    """

    unfreeze_blocks: int
    bn_train: bool = False
    lr: float = 5e-4
    backbone_lr: float = 2e-4
    weight_decay: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> "BackboneFinetuning":
        """From a :class:`prodclass.config.FinetuneConfig`."""
        return cls(cfg.unfreeze_blocks, cfg.bn_train, cfg.lr, cfg.backbone_lr, cfg.weight_decay)

    def split_index(self, model) -> int:
        """Index ``k`` into ``model.backbone.blocks`` where the trainable tail starts.

        Raises:
            ValueError: ``unfreeze_blocks`` is not in ``1..len(blocks)``.
        """
        n = len(model.backbone.blocks)
        if not 1 <= self.unfreeze_blocks <= n:
            raise ValueError(f"finetune.unfreeze_blocks={self.unfreeze_blocks}: {model.backbone.name} has {n} blocks")
        return n - self.unfreeze_blocks

    def _k(self, model) -> int:
        n = len(model.backbone.blocks)
        return n - self.unfreeze_blocks if self.unfreeze_blocks else n

    def freeze(self, model) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Set ``requires_grad``: the head and the unfrozen blocks train, the rest of the backbone
        (the stem, the earlier blocks and the unused ImageNet classifier) does not.

        Returns:
            ``(backbone_params, head_params)`` that now train, in module order.
        """
        blocks = model.backbone.blocks
        k = self._k(model)
        model.backbone.requires_grad_(False)
        for b in blocks[k:]:
            b.requires_grad_(True)
        model.head.requires_grad_(True)
        return [p for b in blocks[k:] for p in b.parameters()], list(model.head.parameters())

    def set_train_mode(self, model) -> None:
        """Train mode for the trainable part only: frozen blocks (with their BatchNorm layers) in
        eval mode; BatchNorm of the unfrozen blocks in eval mode too unless ``bn_train``."""
        model.train()
        for b in model.backbone.blocks[: self._k(model)]:
            b.eval()
        if not self.bn_train:
            for m in model.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def param_groups(self, model) -> list[dict]:
        """AdamW parameter groups of the trainable tensors (call after :meth:`freeze`).

        Returns:
            Up to four groups, backbone then head, each decayed then not:
            ``{"params", "lr", "weight_decay", "name"}`` with
            ``name`` ``backbone``/``head``; tensors with ``ndim <= 1`` or named ``*.bias`` get
            ``weight_decay`` 0 (timm's rule); empty groups are left out.
        """
        blocks = nn.ModuleList(model.backbone.blocks[self._k(model):])
        groups = []
        for name, module, lr in (("backbone", blocks, self.backbone_lr), ("head", model.head, self.lr)):
            decay_first = sorted(param_groups_weight_decay(module, self.weight_decay), key=lambda g: not g["weight_decay"])
            groups += [{**g, "lr": lr, "name": name} for g in decay_first]
        return [g for g in groups if g["params"]]

    def make_optimizer(self, model) -> torch.optim.AdamW:
        """AdamW over :meth:`param_groups` (after :meth:`freeze`)."""
        return torch.optim.AdamW(self.param_groups(model))
