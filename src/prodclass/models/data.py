"""Image-level torch ``Dataset`` over a stored split, for fine-tuning and image evaluation.

Every image goes through the run's :class:`~prodclass.preprocess.Preprocessing` — the function
evaluation, export and serving use. Without augmentation an item is exactly ``prep(path)``;
with it, :class:`~prodclass.models.augment.Augment` replaces the resize/center-crop geometry and the
result is normalised by the same ``prep.normalize``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from prodclass.models.augment import Augment
from prodclass.preprocess import Preprocessing, load_image


class ImageDataset(torch.utils.data.Dataset):
    """``(paths, labels)`` → items ``(x, y)``: float32 ``(3, S, S)`` tensor, int64 class id.

    Args:
        paths: N image files.
        labels: int ``(N,)`` class ids (``None``: every label is -1).
        prep: the run's preprocessing (``S = prep.input_size``).
        augment: training augmentation, or ``None`` (evaluation: ``prep(path)`` exactly).
        seed: with ``augment``, the view of item ``i`` is drawn from
            ``numpy.random.default_rng([seed, key, i])``.
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

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        i, key = divmod(j, self.views) if self.views else (j, self.epoch + 1)
        if self.augment is None or key == 0:
            x = self.prep(self.paths[i])
        else:
            rng = np.random.default_rng([self.seed, key, i])
            x = self.prep.normalize(self.augment(load_image(self.paths[i]), self.prep, rng))
        return torch.from_numpy(x), int(self.labels[i])
