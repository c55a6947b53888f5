"""Image-level data of stage 2: the ``Dataset`` over a stored split and the per-epoch row order.

Every image goes through the run's :class:`~prodclass.preprocess.Preprocessing`, the function
evaluation, export and serving use. Without augmentation an item is exactly ``prep(path)``; with
it, :class:`~prodclass.models.augment.Augment` replaces the resize/center-crop geometry and the
result is normalised by the same ``prep.normalize``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from prodclass.models.augment import Augment, view_seed
from prodclass.preprocess import Preprocessing, load_image


class ImageDataset(torch.utils.data.Dataset):
    """``(paths, labels)`` → items ``(x, y)``: float32 ``(3, S, S)`` tensor, int64 class id.

    Args:
        paths: N image files.
        labels: int ``(N,)`` class ids (``None``: every label is -1).
        prep: the run's preprocessing (``S = prep.input_size``).
        augment: training augmentation, or ``None`` (evaluation: ``prep(path)`` exactly).
        seed: with ``augment``, item ``i`` is augmented with the torch seed
            :func:`prodclass.models.augment.view_seed` ``(seed, key, i)``.
        views: ``None``: N items; item ``i`` is augmented with ``key = epoch + 1`` (set with
            :meth:`set_epoch`), a fresh view each epoch. ``K``: N·K items; item ``i·K + v`` is
            image ``i`` with ``key = v``, where view 0 is the unaugmented image (the frozen-prefix
            feature cache stores these).

    Raises (on access):
        prodclass.preprocess.ImageError: an image that cannot be decoded (names the file).
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | None, prep: Preprocessing,
                 augment: Augment | None = None, seed: int = 0, views: int | None = None):
        self.paths = list(paths)
        self.labels = np.full(len(self.paths), -1, np.int64) if labels is None else np.asarray(labels, np.int64)
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        self.prep, self.augment, self.seed, self.views, self.epoch = prep, augment, seed, views, 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation draw of online training (``views=None``)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths) * (self.views or 1)

    def image(self, j: int) -> np.ndarray:
        """Item ``j``'s image alone: float32 ``(3, S, S)`` array (what :meth:`__getitem__` wraps)."""
        i, key = divmod(j, self.views) if self.views else (j, self.epoch + 1)
        if self.augment is None or key == 0:
            return self.prep(self.paths[i])
        img = self.augment(load_image(self.paths[i]), self.prep, view_seed(self.seed, key, i))
        return self.prep.normalize(img)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        i = j // self.views if self.views else j
        return torch.from_numpy(self.image(j)), int(self.labels[i])


def epoch_order(y_train: np.ndarray, num_classes: int, cfg, epoch: int) -> np.ndarray:
    """The train-row indices of one epoch, ``(N,)`` int64, seeded by ``(cfg.seed, epoch)``.

    Args:
        y_train: int ``(N,)`` class ids of the train rows.
        num_classes: C.
        cfg: a :class:`prodclass.config.FinetuneConfig` (``sampler``, ``seed``).
        epoch: 1-based epoch.

    ``sampler: shuffle``: a permutation. ``balanced``: N draws with replacement, each row weighted
    ``1 / count(its class)`` (torch's ``WeightedRandomSampler``), so every class is drawn equally
    often in expectation.
    """
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    n = len(y_train)
    if cfg.sampler == "balanced":
        counts = np.bincount(y_train, minlength=num_classes)
        w = torch.as_tensor(1.0 / counts[y_train], dtype=torch.float64)
        return np.fromiter(torch.utils.data.WeightedRandomSampler(w, n, replacement=True, generator=g), np.int64, n)
    return torch.randperm(n, generator=g).numpy()


def epoch_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """``order`` cut into batches of ``batch_size`` rows, each sorted (sequential reads of a memmap)."""
    return [np.sort(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
