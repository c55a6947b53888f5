"""Stage 2 of progressive fine-tuning: the last backbone blocks and the head, on images.

The strategy of the reference projects (and of Lightning's ``BackboneFinetuning`` / fastai's
``fine_tune``):

* **Stage 1 — head, backbone frozen.** :func:`prodclass.models.train.train_head` on cached
  embeddings (the backbone runs once per image in eval mode, so this *is* head training on a
  frozen backbone). The pipeline runs it; :func:`finetune` starts from its head.
* **Stage 2 — unfreeze the last N blocks** and train them with the head on augmented images.
  The pieces, one module each: the freezing policy (:mod:`prodclass.models.policy`: which blocks
  train, BatchNorm modes, AdamW groups with discriminative learning rates and no decay on
  biases/BatchNorm), the split of the network at a block boundary (:mod:`prodclass.models.split`),
  the per-batch schedule (:mod:`prodclass.models.schedule`: warm-up + cosine, constant or
  one-cycle), the batch sources (:mod:`prodclass.models.sources`: stored prefix activations or
  online images) and the shared engine (:mod:`prodclass.models.engine`). This module wires them:
  label smoothing, class-weighted loss and/or class-balanced sampling, gradient clipping,
  optional manifold mixup at the split point (``mixup``), an exponential moving average of the
  weights (``ema_decay``; validated and kept instead of the raw weights, as timm's training
  script does), early stopping on validation macro-F1 (the best epoch's weights are kept).
* **Checkpoints.** After every epoch the run's fine-tuning checkpoint
  (:attr:`prodclass.runs.RunDir.finetune_checkpoint`, written atomically by
  :meth:`prodclass.runs.RunDir.save_checkpoint`) holds ``{model, best_model, ema, optimizer,
  scheduler, epoch, best_metric, best_epoch, history, config, classes}`` — tensors, numbers,
  strings, lists and dicts only, read back with ``torch.load(weights_only=True)``. A run that was
  killed resumes from it (``prodclass run --resume RUN_DIR``). Every random draw is seeded per
  epoch (sampling order, view choice, dropout, mixup), so a resumed run equals an uninterrupted one.

**CPU practicality: the frozen-prefix feature cache** (``finetune.feature_cache``, default on,
:mod:`prodclass.models.prefix_cache`). The frozen blocks run once per view (K views per image,
view 0 unaugmented) in ONNX Runtime and the activations are stored (fp16); each epoch trains only
the tail on one stored view per image. The trade-off: K fixed augmentations per image instead of
a fresh one each epoch, K× prefix computation once and K·N·C·H·W·2 bytes of disk, against epochs
that skip image decoding and the prefix entirely (~3x cheaper each; last-3-blocks steps cost
~7 ms/image, the whole network ~45). Measured on the stored abo-small split (37 classes, stage-1
head 0.903 test accuracy; dev runs, test accuracy of the selected epoch): last 3 blocks with K=8
views and weight EMA 0.912 in 12 epochs of ~25 s; K=16 no better (and K=4 0.5 point worse than K=8
from an earlier 0.891 head); 4 unfrozen blocks no better at twice the epoch cost; manifold mixup
(alpha 0.2) lowered validation macro-F1; the whole network but the stem, trained online
(``feature_cache: false``, 8 epochs of ~145 s) reached only 0.903. ``feature_cache: false``
augments online and runs the frozen prefix under ``no_grad`` every batch (the usual GPU setup;
the same code with ``device: cuda``).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from prodclass.config import FinetuneConfig, RunConfig
from prodclass.models.engine import EarlyStopping, evaluate, train_one_epoch
from prodclass.models.policy import BackboneFinetuning
from prodclass.models.schedule import make_scheduler
from prodclass.models.sources import CachedViews, OnlineImages
from prodclass.models.split import Tail
from prodclass.models.train import class_weights

log = logging.getLogger(__name__)

# finetune settings that may change on --resume without changing the result
RESUMABLE = ("device", "num_workers")


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``.

    Raises:
        ValueError: ``cuda`` asked for without a GPU.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"finetune.device={name}: no CUDA device here (use cpu or auto)")
    return dev


def make_criterion(dataset, cfg: FinetuneConfig) -> nn.CrossEntropyLoss:
    """Cross-entropy with label smoothing and, for ``class_weighting: balanced``, the weights of
    :func:`prodclass.models.train.class_weights` computed from the **train split only** of ``dataset``
    (a :class:`prodclass.curate.rules.Dataset`)."""
    weight = class_weights(dataset.labels("train"), len(dataset.classes)) if cfg.class_weighting == "balanced" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        history: one dict per stage-2 epoch: ``epoch, stage ("finetune"), train_loss, train_acc,
            val_loss, val_acc, val_macro_f1, lr`` (head), ``backbone_lr, seconds, best``.
        best_epoch: the epoch whose weights the model holds (0: none beat the start).
        info: timing and cache figures for ``metrics.json``: ``unfreeze_blocks, input_size, device,
            epochs, best_epoch, best_val_macro_f1, start_val_macro_f1, seconds_per_epoch,
            trainable_params, feature_cache, seconds``.
    """

    history: list[dict]
    best_epoch: int
    info: dict = field(default_factory=dict)


@dataclass
class _Training:
    """What one stage-2 run carries from epoch to epoch (and into its checkpoint)."""

    tail: Tail
    policy: BackboneFinetuning
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: torch.optim.swa_utils.AveragedModel | None
    criterion: nn.Module
    stopper: EarlyStopping
    history: list = field(default_factory=list)
    best_state: dict | None = None

    @property
    def selected(self) -> Tail:
        """The weights that are validated and kept: the EMA's when there is one."""
        return self.tail if self.ema is None else self.ema.module

    def lr(self, group: str) -> float:
        return next(g["lr"] for g in self.optimizer.param_groups if g["name"] == group)


def _training(model, k: int, dataset, fc: FinetuneConfig, device: torch.device) -> _Training:
    """Freeze ``model`` per the policy and build the optimizer, schedule, EMA and loss."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    policy = BackboneFinetuning.from_config(fc)
    policy.freeze(model)
    tail = Tail(model, k)
    optimizer = policy.make_optimizer(model)
    scheduler = make_scheduler(optimizer, fc, math.ceil(len(dataset.labels("train")) / fc.batch_size))
    ema = None
    if fc.ema_decay:
        ema = AveragedModel(tail, multi_avg_fn=get_ema_multi_avg_fn(fc.ema_decay), use_buffers=True)
    return _Training(tail, policy, optimizer, scheduler, ema, make_criterion(dataset, fc).to(device),
                     EarlyStopping("max", fc.patience, best=-1.0))


def _checkpoint(t: _Training, epoch: int, cfg_json: dict, classes: list[str]) -> dict:
    return {"model": t.tail.model.state_dict(), "best_model": t.best_state, "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(), "ema": t.ema.state_dict() if t.ema is not None else None,
            "epoch": epoch, "best_metric": t.stopper.best, "best_epoch": t.stopper.best_epoch,
            "history": t.history, "config": cfg_json, "classes": list(classes)}


def _same_finetune_config(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k not in RESUMABLE} == {k: v for k, v in b.items() if k not in RESUMABLE}


def _restore(t: _Training, ck: dict, cfg_json: dict, classes: list[str], path) -> int:
    """Load a checkpoint into ``t``; returns the last finished epoch.

    Raises:
        ValueError: another class map or fine-tuning config, or a checkpoint that does not fit.
    """
    if ck.get("classes") != list(classes) or not _same_finetune_config(ck["config"]["finetune"], cfg_json["finetune"]):
        raise ValueError(f"{path}: checkpoint was written with another class map or finetune config")
    try:
        t.tail.model.load_state_dict(ck["model"])
        t.optimizer.load_state_dict(ck["optimizer"])
        t.scheduler.load_state_dict(ck["scheduler"])
        if t.ema is not None:
            t.ema.load_state_dict(ck["ema"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: checkpoint does not fit this model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160]}); start without --resume") from None
    t.history, t.best_state = ck["history"], ck["best_model"]
    t.stopper.best, t.stopper.best_epoch = ck["best_metric"], ck["best_epoch"]
    return int(ck["epoch"])


def _run_epoch(t: _Training, source, fc: FinetuneConfig, epoch: int, y_val: torch.Tensor) -> dict:
    """Train one epoch, validate the selected weights; returns the epoch's history row."""
    te = time.perf_counter()
    torch.manual_seed(fc.seed * 1_000_003 + epoch)  # dropout: the same draws with or without a resume
    loss, acc = train_one_epoch(t.tail, source.train_batches(epoch), t.optimizer, t.criterion,
                                scheduler=t.scheduler, ema=t.ema, grad_clip=fc.grad_clip, mixup=fc.mixup,
                                rng=np.random.default_rng([fc.seed, epoch, 1]),
                                train_mode=lambda tail: t.policy.set_train_mode(tail.model))
    val = evaluate(source.val_model(t.selected), source.val_inputs(), y_val, source.num_classes)
    return dict(epoch=epoch, stage="finetune", train_loss=loss, train_acc=acc, val_loss=val["loss"],
                val_acc=val["acc"], val_macro_f1=val["macro_f1"], lr=t.lr("head"), backbone_lr=t.lr("backbone"),
                seconds=round(time.perf_counter() - te, 2))


def _fit(t: _Training, source, fc: FinetuneConfig, start: int, y_val: torch.Tensor, save, progress: bool) -> None:
    """Epochs ``start..fc.epochs``, each checkpointed through ``save(epoch)``, until early stopping."""
    from tqdm.auto import tqdm

    if t.history and t.stopper.should_stop(start - 1):  # the checkpoint of a run that had stopped
        return
    bar = tqdm(range(start, fc.epochs + 1), desc="fine-tuning", unit="epoch", disable=not progress)
    for epoch in bar:
        row = _run_epoch(t, source, fc, epoch, y_val)
        t.history.append(row)
        if t.stopper.update(row["val_macro_f1"], epoch):
            t.best_state = copy.deepcopy(t.selected.model.state_dict())
        bar.set_postfix(val_f1=f"{row['val_macro_f1']:.4f}", best=t.stopper.best_epoch)
        save(epoch)
        if t.stopper.should_stop(epoch):
            log.info("early stopping at epoch %d (best %d, val macro-F1 %.4f)", epoch, t.stopper.best_epoch,
                     t.stopper.best)
            break
    bar.close()


def _start(t: _Training, run, resume: bool, cfg_json: dict, classes: list[str], device, echo) -> int:
    """The first epoch to run: after the checkpoint's when resuming from one, else 1 (any old
    checkpoint is removed)."""
    path = run.finetune_checkpoint
    if not (resume and path.is_file()):
        path.unlink(missing_ok=True)
        return 1
    last = _restore(t, run.load_checkpoint(path, map_location=device), cfg_json, classes, path)
    echo(f"finetune: resuming {path} after epoch {last} (best val macro-F1 {t.stopper.best:.4f} "
         f"at {t.stopper.best_epoch})")
    return last + 1


def finetune(model, dataset, cfg: RunConfig, run, resume: bool = False, progress: bool = True,
             echo=print) -> FinetuneResult:
    """Stage 2: unfreeze the last ``cfg.finetune.unfreeze_blocks`` blocks and train on images.

    Args:
        model: a :class:`prodclass.models.heads.Classifier` whose head finished stage 1; trained in
            place and left on the CPU, in eval mode, contiguous memory format, without gradients,
            holding the weights of the best validation macro-F1 epoch (the EMA's, with ``ema_decay``).
        dataset: the run's :class:`prodclass.curate.rules.Dataset` (train rows train, val rows select).
        cfg: the resolved run config (``finetune`` section; ``embed.cache_dir``, ``model.weights``).
        run: the run's :class:`prodclass.runs.RunDir`; its ``finetune_checkpoint`` is written after
            every epoch (the caller removes it once the model is saved).
        resume: continue from that checkpoint when it exists (else start over).
        progress: show progress bars. echo: where one-line status messages go.

    Returns:
        :class:`FinetuneResult`.

    Raises:
        ValueError: a bad ``unfreeze_blocks``/device, or a checkpoint from another config or class map.
        prodclass.preprocess.ImageError: an image that cannot be decoded.
        prodclass.runs.RunDirError: an unreadable checkpoint.
    """
    fc, t0 = cfg.finetune, time.perf_counter()
    device = resolve_device(fc.device)
    k = BackboneFinetuning.from_config(fc).split_index(model)
    model.to(device, memory_format=torch.channels_last if fc.channels_last else torch.contiguous_format)
    t = _training(model, k, dataset, fc, device)
    source = CachedViews.build(model, k, dataset, cfg, device, progress, echo) if fc.feature_cache else \
        OnlineImages(model, k, dataset, fc, device)
    y_val = torch.tensor(dataset.labels("val"), dtype=torch.int64)
    start_f1 = evaluate(source.val_model(t.tail), source.val_inputs(), y_val, source.num_classes)["macro_f1"]
    cfg_json, classes = cfg.model_dump(mode="json"), list(dataset.classes)
    start = _start(t, run, resume, cfg_json, classes, device, echo)
    n_bb = sum(p.numel() for g in t.optimizer.param_groups if g["name"] == "backbone" for p in g["params"])
    n_all = sum(p.numel() for g in t.optimizer.param_groups for p in g["params"])
    echo(f"finetune: unfreezing {fc.unfreeze_blocks} of {len(model.backbone.blocks)} blocks ({n_bb / 1e6:.2f}M "
         f"backbone + {(n_all - n_bb) / 1e6:.2f}M head parameters) at {model.backbone.preprocessing.input_size}px "
         f"on {device}; start val macro-F1 {start_f1:.4f}")
    _fit(t, source, fc, start, y_val,
         lambda epoch: run.save_checkpoint(run.finetune_checkpoint, _checkpoint(t, epoch, cfg_json, classes)), progress)
    if t.best_state is not None:
        model.load_state_dict(t.best_state)
    model.to("cpu", memory_format=torch.contiguous_format).eval().requires_grad_(False)
    best = t.stopper.best_epoch
    history = [dict(h, best=h["epoch"] == best) for h in t.history]
    seconds = [h["seconds"] for h in history]
    info = {"unfreeze_blocks": fc.unfreeze_blocks, "input_size": model.backbone.preprocessing.input_size,
            "device": str(device), "epochs": len(history), "best_epoch": best, "best_val_macro_f1": t.stopper.best,
            "start_val_macro_f1": start_f1, "seconds_per_epoch": round(float(np.mean(seconds)), 2) if seconds else None,
            "trainable_params": n_all, "feature_cache": dict(source.info), "seconds": round(time.perf_counter() - t0, 2)}
    return FinetuneResult(history=history, best_epoch=best, info=info)
