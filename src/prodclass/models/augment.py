"""Training-time augmentations for fine-tuning: random resized crop, flip, small rotation, colour jitter.

The set the reference projects used (Keras ``ImageDataGenerator`` / torchvision's
``RandomResizedCrop + RandomHorizontalFlip + RandomRotation + ColorJitter``), written on PIL so
that every random choice comes from a NumPy generator handed in by the caller. A view is then a
pure function of ``(image, generator seed)``: the same in any thread or worker process, after a
resume, and when stored in the frozen-prefix feature cache. Only the geometry differs from
evaluation; the result goes through the same :meth:`Preprocessing.normalize`.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance

from prodclass.config import AugmentConfig
from prodclass.preprocess import _RESAMPLE, Preprocessing

_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
WHITE = (255, 255, 255)  # catalog photos are shot on white: rotation corners are filled with it


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A crop box ``(left, top, right, bottom)`` in pixels, as torchvision's
    ``RandomResizedCrop.get_params``: area fraction uniform in ``scale``, aspect ratio log-uniform
    in ``ratio``, 10 tries, then a center crop with the ratio clamped to ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class Augment:
    """Apply :class:`AugmentConfig` to an RGB image: rotate → random resized crop to the network
    input size → flip → jitter (brightness, contrast, saturation in random order).

    ``aug(img, prep, rng)`` → RGB ``PIL.Image`` of ``prep.input_size`` square, ready for
    ``prep.normalize``. ``rng`` (``numpy.random.Generator``) supplies every random draw.
    """

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    def __call__(self, img: Image.Image, prep: Preprocessing, rng: np.random.Generator) -> Image.Image:
        c = self.cfg
        if c.rotation > 0:
            img = img.rotate(rng.uniform(-c.rotation, c.rotation), resample=Image.BILINEAR, fillcolor=WHITE)
        box = random_resized_crop_box(img.width, img.height, c.crop_scale, c.crop_ratio, rng)
        img = img.resize((prep.input_size, prep.input_size), _RESAMPLE[prep.interpolation], box=box)
        if rng.random() < c.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if c.color_jitter > 0:
            for i in rng.permutation(len(_ENHANCERS)):
                img = _ENHANCERS[i](img).enhance(rng.uniform(1 - c.color_jitter, 1 + c.color_jitter))
        return img
