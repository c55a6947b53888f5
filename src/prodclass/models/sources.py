"""Where stage-2 batches come from: stored prefix activations, or images run through the prefix.

Both sources give the shared engine (:mod:`prodclass.models.engine`) what it trains and validates
a :class:`prodclass.models.split.Tail` on:

* :meth:`train_batches` ``(epoch)``: ``(h, y)`` batches on the device, rows in
  :func:`prodclass.models.data.epoch_order` (seeded by ``(seed, epoch)``), ``h`` the activations
  entering block ``k``;
* :meth:`val_inputs` ``()`` + :meth:`val_model` ``(tail)``: the validation split's batches and the
  module that maps them to logits.

:class:`CachedViews` (``finetune.feature_cache: true``, the CPU setup): the frozen prefix ran once
per view (:mod:`prodclass.models.prefix_cache`); each epoch trains on one stored view per image,
chosen at random (seeded by ``(seed, epoch)``). :class:`OnlineImages` (``feature_cache: false``,
the usual GPU setup): a fresh augmentation of every image each epoch, the prefix run under
``no_grad`` every batch, validation through the whole model on images.
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np
import torch

from prodclass.config import RunConfig, resolve_cache_dir
from prodclass.models.augment import Augment
from prodclass.models.data import ImageDataset, epoch_batches, epoch_order
from prodclass.models.prefix_cache import feature_cache_key, prefix_features, prefix_runner
from prodclass.models.split import prefix_forward

VAL_BATCH = 256  # stored validation activations per forward


def to_device(x: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    """float32 on ``device``; a 4-D tensor in channels-last memory format if asked."""
    x = x.to(device, torch.float32, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


def prefix_engine(cfg, device: torch.device) -> str:
    """``finetune.prefix_engine``, with ``auto`` → ``onnxruntime`` on the CPU, ``torch`` on CUDA."""
    if cfg.prefix_engine != "auto":
        return cfg.prefix_engine
    return "torch" if device.type == "cuda" else "onnxruntime"


class CachedViews:
    """Tail inputs read from the frozen-prefix feature cache.

    Args:
        train: float16 ``(N, K, C, H, W)`` stored views of the train images (view 0 unaugmented).
        val: float16 ``(M, 1, C, H, W)`` of the validation images.
        y_train: int ``(N,)`` class ids. cfg: the :class:`prodclass.config.FinetuneConfig`.
        num_classes: C. device: where batches go. info: the cache figures for ``metrics.json``.
    """

    def __init__(self, train: np.ndarray, val: np.ndarray, y_train: np.ndarray, cfg, num_classes: int,
                 device: torch.device, info: dict):
        self.train, self.val, self.y_train, self.cfg = train, val, y_train, cfg
        self.num_classes, self.device, self.info = num_classes, device, info

    @classmethod
    def build(cls, model, k: int, dataset, cfg: RunConfig, device: torch.device, progress: bool = True,
              echo=print) -> "CachedViews":
        """Compute (or reuse) the stored views of the train and validation splits of ``dataset``.

        Files live under ``<cache dir>/features/<feature_cache_key>/{train,val}.npy``; a missing one
        is computed by :func:`prodclass.models.prefix_cache.prefix_runner` on a copy of ``model``.

        Raises:
            prodclass.preprocess.ImageError: an image that cannot be decoded.
            RuntimeError: the ONNX prefix disagrees with torch.
        """
        fc, t = cfg.finetune, time.perf_counter()
        root, engine = resolve_cache_dir(cfg.embed.cache_dir) / "features", prefix_engine(fc, device)
        run_prefix, stores, info = None, {}, {"enabled": True}
        for name, views, augment in (("train", fc.views, Augment(fc.augment)), ("val", 1, None)):
            paths, y = dataset.split_table(name)["image_path"].tolist(), dataset.labels(name)
            file = root / feature_cache_key(model, k, fc, paths, cfg.model.weights, views, engine) / f"{name}.npy"
            reused = file.is_file()
            if not reused and run_prefix is None:
                run_prefix = prefix_runner(model, k, engine, device)
            ds = ImageDataset(paths, y, model.backbone.preprocessing, augment, fc.seed, views=views)
            stores[name] = prefix_features(run_prefix, ds, file, fc.batch_size, fc.num_workers or 2, progress)
            info[name] = {"file": str(file), "shape": list(stores[name].shape), "reused": reused,
                          "mbytes": round(stores[name].nbytes / 2**20, 1)}
        info.update(engine=engine, seconds=round(time.perf_counter() - t, 2))
        echo(f"finetune: frozen-prefix features ({fc.views} views/train image, {tuple(stores['train'].shape[2:])} "
             f"each, {info['train']['mbytes'] + info['val']['mbytes']:.0f} MB) in {info['seconds']:.0f}s")
        return cls(stores["train"], stores["val"], dataset.labels("train"), fc, len(dataset.classes), device, info)

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of ``(h, y)``: each image once, as one of its views drawn by ``(seed, epoch)``."""
        fc = self.cfg
        view = np.random.default_rng([fc.seed, epoch]).integers(fc.views, size=len(self.y_train))
        for idx in epoch_batches(epoch_order(self.y_train, self.num_classes, fc, epoch), fc.batch_size):
            h = torch.from_numpy(np.asarray(self.train[idx, view[idx]]))
            yield to_device(h, self.device, fc.channels_last), torch.tensor(self.y_train[idx]).to(self.device)

    def val_inputs(self) -> Iterator[torch.Tensor]:
        """The stored validation activations, ``VAL_BATCH`` rows at a time."""
        for i in range(0, len(self.val), VAL_BATCH):
            h = torch.from_numpy(np.array(self.val[i : i + VAL_BATCH, 0]))
            yield to_device(h, self.device, self.cfg.channels_last)

    @staticmethod
    def val_model(tail):
        """Validation runs the tail on the stored activations."""
        return tail


class OnlineImages:
    """Tail inputs computed every batch: augmented images through the frozen prefix of ``model``.

    Args:
        model: the Classifier being trained (its frozen blocks run under ``no_grad``).
        k: split index. dataset: the run's :class:`prodclass.curate.rules.Dataset`.
        cfg: the :class:`prodclass.config.FinetuneConfig`. device: where batches go.
    """

    info = {"enabled": False}

    def __init__(self, model, k: int, dataset, cfg, device: torch.device):
        prep = model.backbone.preprocessing
        self.model, self.k, self.cfg, self.device = model, k, cfg, device
        self.num_classes, self.y_train = len(dataset.classes), dataset.labels("train")
        self.train = ImageDataset(dataset.split_table("train")["image_path"].tolist(), self.y_train, prep,
                                  Augment(cfg.augment), cfg.seed)
        self.val = ImageDataset(dataset.split_table("val")["image_path"].tolist(), dataset.labels("val"), prep)

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of ``(h, y)``: a fresh augmentation per image (``key = epoch + 1``)."""
        fc = self.cfg
        self.train.set_epoch(epoch)
        chunks = epoch_batches(epoch_order(self.y_train, self.num_classes, fc, epoch), fc.batch_size)
        for x, y in torch.utils.data.DataLoader(self.train, batch_sampler=chunks, num_workers=fc.num_workers):
            with torch.no_grad():
                h = prefix_forward(self.model, to_device(x, self.device, fc.channels_last), self.k)
            yield h, y.to(self.device)

    def val_inputs(self) -> Iterator[torch.Tensor]:
        """The validation images, preprocessed as in evaluation."""
        loader = torch.utils.data.DataLoader(self.val, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers)
        for x, _ in loader:
            yield to_device(x, self.device, self.cfg.channels_last)

    @staticmethod
    def val_model(tail):
        """Validation runs the whole Classifier (the tail's) on images."""
        return tail.model
