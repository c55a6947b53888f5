"""Training-time augmentations for fine-tuning, from torchvision ``transforms.v2``.

:class:`Augment` builds, from :class:`prodclass.config.AugmentConfig`, the reference projects'
set (Keras ``ImageDataGenerator`` / torchvision's classification recipe), on PIL images:

1. ``RandomRotation(±rotation°)``, bilinear, corners filled white (catalog photos are shot on
   white); left out when ``rotation`` is 0;
2. ``RandomResizedCrop(input_size, scale=crop_scale, ratio=crop_ratio)`` with the run's
   interpolation (``crop_scale`` (1, 1): the whole image, resized);
3. ``RandomHorizontalFlip(hflip)``; left out when ``hflip`` is 0;
4. ``ColorJitter(brightness, contrast, saturation = color_jitter)`` (factors uniform in
   ``1 ± color_jitter``, applied in random order); left out when ``color_jitter`` is 0.

Only the geometry and colours differ from evaluation; the result is normalised by the same
:meth:`prodclass.preprocess.Preprocessing.normalize`.

**Determinism.** torchvision draws its parameters from torch's global generator. A view is made
a pure function of ``(image, seed)`` by running the transform under
``torch.random.fork_rng(devices=[])`` after ``torch.manual_seed(seed)``, holding a lock so that
two threads never share the global generator at once (decoding still runs in parallel; the
caller's own global RNG state is restored). :func:`view_seed` derives the seed from
``(run seed, view or epoch key, image index)``, so a view is the same in any thread or worker
process, after a resume, and when stored in the frozen-prefix feature cache.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from PIL import Image

from prodclass import _torchvision  # noqa: F401  (must precede the torchvision import)
from prodclass.config import AugmentConfig

# isort: split
from torchvision.transforms import v2

IMPL = "tv2"  # part of the feature-cache key: views stored by another implementation are not reused
WHITE = (255, 255, 255)
_RNG_LOCK = threading.Lock()


def view_seed(seed: int, key: int, index: int) -> int:
    """The torch seed of one augmented view: a 63-bit hash of ``(seed, key, index)`` (NumPy's
    ``SeedSequence``), stable across processes, platforms and versions."""
    return int(np.random.SeedSequence([seed, key, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def build_transform(cfg: AugmentConfig, input_size: int, interpolation: str = "bicubic") -> v2.Compose:
    """The torchvision ``v2.Compose`` of ``cfg``: PIL RGB image → PIL RGB ``input_size`` square.

    Args:
        cfg: the augmentation settings.
        input_size: side of the network input, px.
        interpolation: of the crop's resize (``bicubic``, ``bilinear`` or ``nearest``), the run's.
    """
    ops: list = []
    if cfg.rotation > 0:
        ops.append(v2.RandomRotation(cfg.rotation, interpolation=v2.InterpolationMode.BILINEAR, fill=WHITE))
    ops.append(v2.RandomResizedCrop(input_size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
                                    interpolation=v2.InterpolationMode(interpolation)))
    if cfg.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        ops.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    return v2.Compose(ops)


class Augment:
    """Apply :class:`AugmentConfig` to an RGB image, reproducibly.

    ``aug(img, prep, seed)`` → RGB ``PIL.Image`` of ``prep.input_size`` square, ready for
    ``prep.normalize``; the same ``(img, prep, seed)`` always gives the same pixels. Transforms are
    built once per ``(input size, interpolation)``.
    """

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg
        self._transforms: dict[tuple[int, str], v2.Compose] = {}

    def transform(self, prep) -> v2.Compose:
        """The ``v2.Compose`` for a :class:`prodclass.preprocess.Preprocessing`."""
        key = (prep.input_size, prep.interpolation)
        if key not in self._transforms:
            self._transforms[key] = build_transform(self.cfg, *key)
        return self._transforms[key]

    def __call__(self, img: Image.Image, prep, seed: int) -> Image.Image:
        t = self.transform(prep)
        with _RNG_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return t(img)
