"""Stage 1: the classifier head trained on cached embeddings, through the shared engine.

:func:`train_head` runs :func:`prodclass.models.engine.train_one_epoch` /
:func:`prodclass.models.engine.evaluate` with AdamW and early stopping on validation loss (the
best epoch's weights are restored). It writes no file: the caller saves the model.

Every random draw is seeded from ``cfg.seed``, in this order, which the published figures depend
on: ``torch.manual_seed(seed)``; one forward of a zero row through the head (in the mode it was
handed, to read the class count; with dropout in train mode it draws from the global generator);
the DataLoader's shuffle order from its own ``torch.Generator().manual_seed(seed)``; dropout
during training from the global generator. The optimizer is AdamW over all head parameters with
one weight decay (the reference projects' setting; stage 2 exempts biases).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from torch import nn

from prodclass.config import TrainConfig
from prodclass.models.engine import EarlyStopping, evaluate, train_one_epoch

log = logging.getLogger(__name__)

EVAL_BATCH = 1024  # rows per forward when evaluating


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


def _rows(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [x[i : i + batch_size] for i in range(0, len(x), batch_size)]


def train_head(
    head: nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    cfg: TrainConfig,
    progress: bool = True,
) -> list[dict]:
    """Train ``head`` on embeddings with AdamW and early stopping on validation loss.

    Args:
        head: maps ``(B, D)`` float32 embeddings to ``(B, C)`` logits; trained in place and
            left holding the weights of the epoch with the lowest validation loss (improvements
            must exceed 1e-4; training stops ``cfg.patience`` epochs after the best).
        x_train, x_val: float32 ``(N, D)`` embeddings. y_train, y_val: int ``(N,)`` class ids.
        cfg: epochs, batch size, learning rate, weight decay, label smoothing, class
            weighting, patience, seed.
        progress: show a progress bar.

    Returns:
        History: one dict per epoch with ``epoch, stage ("head"), train_loss, train_acc,
        val_loss, val_acc, lr, best`` (``best``: the epoch whose weights the head holds).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    num_classes = head(torch.zeros(1, x_train.shape[1])).shape[1]  # part of the seeded stream, see above
    xt, yt = torch.from_numpy(np.asarray(x_train, np.float32)), torch.from_numpy(np.asarray(y_train, np.int64))
    xv, yv = torch.from_numpy(np.asarray(x_val, np.float32)), torch.from_numpy(np.asarray(y_val, np.int64))
    weight = class_weights(y_train, num_classes) if cfg.class_weighting == "balanced" else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, yt), batch_size=cfg.batch_size,
                                         shuffle=True, generator=torch.Generator().manual_seed(cfg.seed))
    stopper, best_state, history = EarlyStopping("min", cfg.patience), None, []
    bar = tqdm(range(1, cfg.epochs + 1), desc="training head", unit="epoch", disable=not progress)
    for epoch in bar:
        tr_loss, tr_acc = train_one_epoch(head, loader, optimizer, loss_fn)
        val = evaluate(head, _rows(xv, EVAL_BATCH), yv)
        history.append(dict(epoch=epoch, stage="head", train_loss=tr_loss, train_acc=tr_acc,
                            val_loss=val["loss"], val_acc=val["acc"], lr=optimizer.param_groups[0]["lr"]))
        bar.set_postfix(val_loss=f"{val['loss']:.3f}", val_acc=f"{val['acc']:.3f}")
        if stopper.update(val["loss"], epoch):
            best_state = copy.deepcopy(head.state_dict())
        elif stopper.should_stop(epoch):
            log.info("early stopping at epoch %d (best %d, val loss %.4f)", epoch, stopper.best_epoch, stopper.best)
            break
    bar.close()
    if best_state is not None:
        head.load_state_dict(best_state)
    return [dict(h, best=h["epoch"] == stopper.best_epoch) for h in history]
