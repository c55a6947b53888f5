"""The one training engine of both stages (torchvision ``references/classification`` shape).

* :func:`train_one_epoch`: one pass of optimisation over ``(x, y)`` batches.
* :func:`predict` / :func:`evaluate`: logits, and loss / accuracy / macro-F1, in eval mode.
* :class:`EarlyStopping`: the best value, its epoch, and when to stop.

Stage 1 (:func:`prodclass.models.train.train_head`) feeds the head ``(B, D)`` cached embeddings;
stage 2 (:func:`prodclass.models.finetune.finetune`) feeds a :class:`prodclass.models.split.Tail`
the frozen prefix's activations, stored or computed online. The engine does not know which: a
model maps its batch ``x`` to ``(B, C)`` logits, ``y`` holds int64 class ids.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def train_one_epoch(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, criterion: Callable, *,
                    scheduler=None, ema=None, grad_clip: float | None = None, mixup: float = 0.0,
                    rng: np.random.Generator | None = None,
                    train_mode: Callable[[nn.Module], None] | None = None) -> tuple[float, float]:
    """One pass over ``batches``; returns ``(mean loss, accuracy)`` on the training batches.

    Per batch: forward, ``criterion``, ``zero_grad``, backward, optional gradient clipping
    (global norm ``grad_clip`` over the optimizer's tensors), ``optimizer.step()``, then
    ``scheduler.step()`` and ``ema.update_parameters(model)`` when given.

    Args:
        model: ``x`` → ``(B, C)`` logits.
        batches: iterable of ``(x, y)`` on the model's device.
        criterion: ``(logits, y)`` → scalar loss.
        scheduler: a learning-rate scheduler stepped per batch.
        ema: a ``torch.optim.swa_utils.AveragedModel`` of ``model``.
        mixup: ``alpha > 0``: each batch trains on ``lam * x + (1 - lam) * x[perm]`` with the loss
            mixed the same way, ``lam ~ Beta(alpha, alpha)`` and ``perm`` drawn from ``rng``
            (input mixup; manifold mixup when ``x`` are a tail's input activations).
        rng: the generator of the mixup draws.
        train_mode: puts ``model`` in its training mode (default ``model.train()``; stage 2 passes
            :meth:`prodclass.models.policy.BackboneFinetuning.set_train_mode`).

    Raises:
        ValueError: ``batches`` was empty.
    """
    (train_mode or nn.Module.train)(model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    total, correct, loss_sum = 0, 0, 0.0
    for x, y in batches:
        if mixup > 0:
            lam = float(rng.beta(mixup, mixup))
            perm = torch.from_numpy(rng.permutation(len(y))).to(y.device)
            logits = model(lam * x + (1 - lam) * x[perm])
            loss = lam * criterion(logits, y) + (1 - lam) * criterion(logits, y[perm])
        else:
            logits = model(x)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        total += len(y)
    if not total:
        raise ValueError("train_one_epoch: no batches")
    return loss_sum / total, correct / total


@torch.no_grad()
def predict(model: nn.Module, inputs: Iterable[torch.Tensor]) -> torch.Tensor:
    """Logits of ``model`` in eval mode over ``inputs`` (batches of ``x``): float32 ``(N, C)`` on the CPU."""
    model.eval()
    return torch.cat([model(x).float().cpu() for x in inputs])


def macro_f1(y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of the per-class F1 over classes ``0..num_classes-1`` (scikit-learn; an
    absent, never-predicted class counts 0)."""
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, labels=np.arange(num_classes), average="macro", zero_division=0))


def evaluate(model: nn.Module, inputs: Iterable[torch.Tensor], y: torch.Tensor,
             num_classes: int | None = None) -> dict:
    """Cross-entropy (no smoothing, no class weights) and accuracy of ``model`` on a split.

    Args:
        model: ``x`` → ``(B, C)`` logits; evaluated in eval mode without gradients.
        inputs: the split's batches of ``x``, in the order of ``y``.
        y: int64 ``(N,)`` class ids on the CPU.
        num_classes: also compute ``macro_f1`` over this many classes.

    Returns:
        ``{"loss", "acc"}`` (+ ``"macro_f1"``), floats.
    """
    logits = predict(model, inputs)
    out = {"loss": F.cross_entropy(logits, y).item(), "acc": (logits.argmax(1) == y).float().mean().item()}
    if num_classes is not None:
        out["macro_f1"] = macro_f1(y.numpy(), logits.argmax(1).numpy(), num_classes)
    return out


class EarlyStopping:
    """Track the best validation value and stop after ``patience`` epochs without improvement.

    Args:
        mode: ``min`` (a loss) or ``max`` (a score).
        patience: epochs without improvement before :meth:`should_stop` is true.
        min_delta: an improvement must beat the best by more than this.
        best, best_epoch: the state to continue from (a resumed run).
    """

    def __init__(self, mode: str, patience: int, min_delta: float = 1e-4, best: float | None = None,
                 best_epoch: int = 0):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode {mode!r}: expected min or max")
        self.mode, self.patience, self.min_delta = mode, patience, min_delta
        self.best = best if best is not None else (math.inf if mode == "min" else -math.inf)
        self.best_epoch = best_epoch

    def update(self, value: float, epoch: int) -> bool:
        """Record ``epoch``'s value; true when it improved on the best (which it then becomes)."""
        better = value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        if better:
            self.best, self.best_epoch = value, epoch
        return better

    def should_stop(self, epoch: int) -> bool:
        """True when ``epoch`` is ``patience`` or more epochs after the best one."""
        return epoch - self.best_epoch >= self.patience
