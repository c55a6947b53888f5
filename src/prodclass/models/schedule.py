"""Learning-rate schedules of stage 2, built from torch's schedulers and stepped once per batch.

``finetune.schedule``:

* ``cosine``: ``SequentialLR(LinearLR warm-up, CosineAnnealingLR)``. The warm-up rises linearly
  over ``W = round(warmup_epochs * steps_per_epoch)`` steps from ``peak / (W + 1)`` to the peak
  (step ``s < W`` has factor ``(s + 1) / (W + 1)``), then the cosine decays over the remaining
  steps to ``eta_min``. torch's ``eta_min`` is one number for all parameter groups: it is 1% of
  the *smallest* group peak (``0.01 * backbone_lr`` with the default learning rates), so no
  group ends below 1% of its own peak's scale.
* ``constant``: the same warm-up, then the peak (``LinearLR`` holds its end factor).
* ``onecycle``: ``OneCycleLR`` with the warm-up as its rising part (``pct_start = W / total``),
  cosine annealing, per-group ``max_lr`` = each group's learning rate.

Every scheduler's ``state_dict`` holds only numbers, strings, lists and dicts, so it is stored in
the resume checkpoint and read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import torch
from torch.optim import lr_scheduler


def warmup_steps(cfg, steps_per_epoch: int) -> tuple[int, int]:
    """``(warm-up steps, total steps)`` of a schedule over ``cfg.epochs`` epochs.

    Args:
        cfg: a :class:`prodclass.config.FinetuneConfig` (``epochs``, ``warmup_epochs``).
        steps_per_epoch: optimizer steps (batches) per epoch.

    Returns:
        ``total = max(1, epochs * steps_per_epoch)`` and the warm-up, at most ``total - 1``.
    """
    total = max(1, cfg.epochs * steps_per_epoch)
    return min(total - 1, round(cfg.warmup_epochs * steps_per_epoch)), total


def make_scheduler(optimizer: torch.optim.Optimizer, cfg, steps_per_epoch: int) -> lr_scheduler.LRScheduler:
    """The per-batch schedule of ``cfg.schedule`` (see the module docstring).

    Args:
        optimizer: its groups' ``lr`` are the peaks.
        cfg: a :class:`prodclass.config.FinetuneConfig` (``schedule``, ``epochs``, ``warmup_epochs``).
        steps_per_epoch: batches per epoch.

    Raises:
        ValueError: an unknown ``cfg.schedule``.
    """
    warm, total = warmup_steps(cfg, steps_per_epoch)
    peaks = [g["lr"] for g in optimizer.param_groups]
    if cfg.schedule == "onecycle":
        return lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total,
                                       pct_start=max(warm, 1) / total, anneal_strategy="cos")
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"finetune.schedule={cfg.schedule!r}: expected cosine, constant or onecycle")
    if cfg.schedule == "cosine" and warm == 0:
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=0.01 * min(peaks))
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=1 / (warm + 1), end_factor=1.0, total_iters=warm)
    if cfg.schedule == "constant":
        return warmup
    cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warm, eta_min=0.01 * min(peaks))
    return lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warm])
