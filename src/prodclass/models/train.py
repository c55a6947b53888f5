"""Head training on cached embeddings (torchvision ``references/classification`` style).

``train_one_epoch`` / ``evaluate_loss`` do one pass each; :func:`train_head` loops them with
AdamW, early stopping on validation loss (the best epoch's weights are restored) and an
atomic checkpoint of the best head.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from prodclass.config import TrainConfig
from prodclass.io import save_torch

log = logging.getLogger(__name__)


def class_weights(y_train: np.ndarray, num_classes: int) -> torch.Tensor:
    """"Balanced" class weights ``n / (num_classes * count_c)`` (scikit-learn's
    ``compute_class_weight('balanced')``), from the training labels only.

    Args:
        y_train: int ``(N,)`` class ids of the train split.
    Returns:
        float32 ``(num_classes,)``; a class absent from ``y_train`` gets weight 0.
    """
    counts = np.bincount(y_train, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(y_train) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def train_one_epoch(model, loader, optimizer, loss_fn) -> tuple[float, float]:
    """One pass over ``loader``; returns (mean loss, accuracy) on the training batches."""
    model.train()
    total, correct, loss_sum = 0, 0, 0.0
    for x, y in loader:
        logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        total += len(y)
    return loss_sum / total, correct / total


@torch.no_grad()
def evaluate_loss(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``x`` (N, D) / ``y`` (N,), in eval mode."""
    model.eval()
    logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train_head(
    head: nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    cfg: TrainConfig,
    checkpoint_path: str | Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train ``head`` on embeddings with AdamW and early stopping on validation loss.

    Args:
        head: maps ``(B, D)`` float32 embeddings to ``(B, C)`` logits; trained in place and
            left holding the weights of the epoch with the lowest validation loss.
        x_train, x_val: float32 ``(N, D)`` embeddings. y_train, y_val: int ``(N,)`` class ids.
        cfg: epochs, batch size, learning rate, weight decay, label smoothing, class
            weighting, patience, seed.
        checkpoint_path: where the best head is saved (atomically) whenever it improves.

    Returns:
        History: one dict per epoch with ``epoch, stage, train_loss, train_acc, val_loss,
        val_acc, lr``.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    num_classes = head(torch.zeros(1, x_train.shape[1])).shape[1]
    xt, yt = torch.from_numpy(np.asarray(x_train, np.float32)), torch.from_numpy(np.asarray(y_train, np.int64))
    xv, yv = torch.from_numpy(np.asarray(x_val, np.float32)), torch.from_numpy(np.asarray(y_val, np.int64))
    weight = class_weights(y_train, num_classes) if cfg.class_weighting == "balanced" else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(xt, yt), batch_size=cfg.batch_size, shuffle=True, generator=gen
    )
    best_loss, best_state, best_epoch, history = math.inf, None, 0, []
    bar = tqdm(range(1, cfg.epochs + 1), desc="training head", unit="epoch", disable=not progress)
    for epoch in bar:
        tr_loss, tr_acc = train_one_epoch(head, loader, optimizer, loss_fn)
        va_loss, va_acc = evaluate_loss(head, xv, yv)
        history.append(dict(epoch=epoch, stage="head", train_loss=tr_loss, train_acc=tr_acc,
                            val_loss=va_loss, val_acc=va_acc, lr=optimizer.param_groups[0]["lr"]))
        bar.set_postfix(val_loss=f"{va_loss:.3f}", val_acc=f"{va_acc:.3f}")
        if va_loss < best_loss - 1e-4:
            best_loss, best_epoch = va_loss, epoch
            best_state = copy.deepcopy(head.state_dict())
            if checkpoint_path is not None:
                save_torch(checkpoint_path, {"head": best_state, "optimizer": optimizer.state_dict(),
                                             "epoch": epoch, "best_val_loss": best_loss})
        elif epoch - best_epoch >= cfg.patience:
            log.info("early stopping at epoch %d (best %d, val loss %.4f)", epoch, best_epoch, best_loss)
            break
    bar.close()
    if best_state is not None:
        head.load_state_dict(best_state)
    for h in history:
        h["best"] = h["epoch"] == best_epoch
    return history
