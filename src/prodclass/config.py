"""Run configuration: YAML → validated pydantic model. All defaults live here.

A config file names a catalog source, curation rules, a backbone/head and training settings.
``load_config`` resolves it (defaults filled in, dotted ``--set`` overrides applied) and the
resolved form is what every run saves as ``config.yaml`` beside its model.

Where data lives is a setting, not a constant: relative ``data.path``/``data.image_dir`` are
resolved against the data root, taken from (first match wins) the ``--data-root`` CLI option,
the ``PRODCLASS_DATA`` environment variable, or ``./data``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DATA_ENV = "PRODCLASS_DATA"
CACHE_ENV = "PRODCLASS_CACHE"
DEFAULT_DATA_ROOT = Path("data")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    """Where the catalog comes from and how its columns map onto the Catalog table."""

    source: Literal["table", "abo", "folders", "fashion_mnist"] = "table"
    path: str = Field(..., description="table file, ABO root, class-folder root or IDX directory")
    image_dir: str | None = Field(None, description="image folder for source=table")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Catalog column ← source column, e.g. {image_path: image_name}"
    )
    language: str = Field("en_US", description="preferred language tag for multilingual ABO fields")
    split: Literal["train", "test", "all"] = Field("all", description="fashion_mnist: which IDX files")
    label: str = Field("product_type", description="the Catalog column to classify")


class SplitConfig(_Strict):
    train: float = 0.7
    val: float = 0.1
    test: float = 0.2

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6 or min(self.train, self.val, self.test) <= 0:
            raise ValueError(f"split fractions must be > 0 and sum to 1, got {total:.3f}")
        return self


class CurationConfig(_Strict):
    """Declarative label rules, applied in this order: merge → drop → min → cap → split."""

    merge: dict[str, str] = Field(default_factory=dict, description="label → label it becomes")
    drop: list[str] = Field(default_factory=list, description="labels whose rows are removed")
    min_per_class: int = Field(1, ge=1, description="classes with fewer images are removed")
    max_per_class: int | None = Field(None, ge=1, description="cap per class (random, seeded)")
    main_images_only: bool = Field(True, description="keep only is_main_image rows")
    split: SplitConfig = Field(default_factory=SplitConfig)
    seed: int = 0


class ModelConfig(_Strict):
    backbone: str = "efficientnet_lite0"
    weights: str | None = Field(None, description="a weights file to load instead of the packaged ImageNet weights")
    head: Literal["mlp", "linear"] = "mlp"
    hidden_dim: int = Field(256, ge=1, description="mlp head: Dense 256 as in the reference projects")
    dropout: float = Field(0.4, ge=0.0, lt=1.0)


class TrainConfig(_Strict):
    """Head training on cached embeddings."""

    epochs: int = Field(200, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0, description="AdamW decoupled weight decay")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weighting: Literal["none", "balanced"] = "none"
    patience: int = Field(15, ge=1, description="early stopping on validation loss")
    seed: int = 0


class EmbedConfig(_Strict):
    batch_size: int = Field(32, ge=1)
    num_threads: int | None = Field(None, description="torch intra-op threads (default: all cores)")
    cache_dir: str | None = Field(None, description=f"default: ${CACHE_ENV} or ~/.cache/prodclass")


class EvalConfig(_Strict):
    top_k: int = Field(5, ge=1)
    target_precision: float = Field(
        0.95, gt=0, le=1, description="abstention: precision among accepted predictions the threshold aims at (on val)"
    )


class AugmentConfig(_Strict):
    """Training-time image augmentations (stage 2 only; evaluation, export and serving use none).

    The reference projects' set: random resized crop, horizontal flip, small rotation, colour
    jitter, built from torchvision ``transforms.v2`` (:mod:`prodclass.models.augment`). Each view
    runs under a torch generator seeded by (seed, epoch or view, image), so an augmented view is
    reproducible and independent of worker/thread order.
    """

    crop_scale: tuple[float, float] = Field((0.5, 1.0), description="random resized crop: area fraction range; (1, 1) = off")
    crop_ratio: tuple[float, float] = Field((0.75, 1.3333), description="random resized crop: aspect ratio range")
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    rotation: float = Field(10.0, ge=0, le=180, description="max rotation, degrees (uniform ±); 0 = off")
    color_jitter: float = Field(0.2, ge=0, lt=1, description="brightness/contrast/saturation factor range 1±x; 0 = off")


class FinetuneConfig(_Strict):
    """Stage 2 of progressive fine-tuning (:mod:`prodclass.models.finetune`): unfreeze the last blocks.

    Stage 1 is the head trained on cached embeddings (``train``); stage 2 starts from it and
    trains the last ``unfreeze_blocks`` of ``Backbone.blocks`` plus the head on images.
    """

    enabled: bool = Field(False, description="run stage 2 after the head")
    unfreeze_blocks: int = Field(3, ge=1, description="last N entries of Backbone.blocks to train (lite0 has 9)")
    input_size: int | None = Field(None, ge=32, description="network input side, px (default: the backbone's); "
                                   "used by the whole run and saved in model.pt")
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(5e-4, gt=0, description="head learning rate (peak)")
    backbone_lr: float = Field(2e-4, gt=0, description="learning rate of the unfrozen blocks (peak)")
    weight_decay: float = Field(0.02, ge=0, description="AdamW decoupled decay (not on biases/BatchNorm)")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    mixup: float = Field(0.0, ge=0, description="manifold mixup at the split point (Verma et al. 2019): mix pairs of "
                         "tail inputs and their losses with lambda ~ Beta(mixup, mixup); 0 = off")
    class_weighting: Literal["none", "balanced"] = Field("none", description="balanced: weighted cross-entropy")
    sampler: Literal["shuffle", "balanced"] = Field("shuffle", description="balanced: class-balanced sampling")
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up (cosine/constant); onecycle's rising part")
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm; null = off")
    patience: int = Field(5, ge=1, description="early stopping on validation macro-F1, epochs")
    ema_decay: float | None = Field(0.995, ge=0, lt=1, description="keep an exponential moving average of the "
                                    "weights (per step), validate and select it; null = off")
    bn_train: bool = Field(False, description="BatchNorm of unfrozen blocks in train mode (frozen blocks: always eval)")
    feature_cache: bool = Field(True, description="run the frozen prefix once per view and train the tail on "
                                "stored activations (fp16 under the cache dir)")
    views: int = Field(8, ge=1, description="feature_cache: views per train image (view 0 unaugmented)")
    prefix_engine: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto", description="feature_cache: what runs the frozen prefix (auto: onnxruntime on CPU, torch on CUDA)")
    channels_last: bool = Field(True, description="NHWC memory format (faster convolutions on CPU)")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    num_workers: int = Field(0, ge=0, description="image decoding: DataLoader worker processes for online "
                             "training; threads for the feature cache (0: 2 threads)")
    seed: int = 0
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class RunConfig(_Strict):
    """One run: catalog → curated split → embeddings → head → evaluation."""

    name: str = "run"
    output_dir: str = "runs"
    data: DataConfig
    curation: CurationConfig = Field(default_factory=CurationConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError(f"run name {v!r} must be a plain folder name")
        return v


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate (message names file and field)."""


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply ``key.sub=value`` overrides, validate.

    Raises:
        ConfigError: unreadable YAML, unknown field, or a value of the wrong type; the message
            names the file and the dotted field.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Validate a config mapping, raising :class:`ConfigError` naming each bad field."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"{source}: {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError("; ".join(lines)) from None


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what a run saves as ``config.yaml``)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def resolve_data_root(cli_value: str | os.PathLike | None = None) -> Path:
    """Data root: ``--data-root`` if given, else ``$PRODCLASS_DATA``, else ``./data``."""
    if cli_value:
        return Path(cli_value).expanduser()
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else DEFAULT_DATA_ROOT


def resolve_data_path(value: str, data_root: Path) -> Path:
    """An absolute path stays; a relative one is taken under the data root."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else data_root / p


def resolve_cache_dir(value: str | None = None) -> Path:
    """Cache root: the config value, else ``$PRODCLASS_CACHE``, else ``~/.cache/prodclass``."""
    if value:
        return Path(value).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prodclass"
