"""The run directory: everything needed to reproduce a result or use its model alone.

::

    runs/<name>-<YYYYmmdd-HHMMSS>/
      config.yaml            resolved config (defaults filled in)
      versions.json          Python and library versions, platform
      dataset.parquet        curated rows with label and split (the stored split)
      class_map.json         {"classes": [...]}: class id -> name
      class_counts.csv/.png  images per class before/after curation, per split
      model.pt               checkpoint dict: backbone name, head config, classes,
                             preprocessing, state_dict of the whole Classifier
      history.json           per-epoch losses/accuracies (stage "head", "finetune", ...)
      metrics.json           test metrics (+ "embedding" and "timing" sections)
      per_class.csv          per-class precision/recall/F1/support, worst first
      confusion_matrix.png
      predictions_{val,test}.parquet   image_path, item_id, y_true, y_pred, logits (list of C)
      calibration.json       (optional) {"temperature": T, ...}
      abstention.json        (optional) {"threshold": t, ...}

:func:`load_model` rebuilds the network from ``model.pt`` without the training config.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
import time
from pathlib import Path

import torch

from prodclass.io import read_json, save_torch, write_json

MODEL_FILE = "model.pt"
FORMAT_VERSION = 1
_VERSIONED = ("prodclass", "torch", "torchvision", "timm", "numpy", "pandas", "scikit-learn", "Pillow", "onnxruntime")


def new_run_dir(output_dir: str | Path, name: str) -> Path:
    """Create ``output_dir/<name>-<timestamp>`` (a suffix is added if it exists)."""
    base = Path(output_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    path.mkdir(parents=True)
    return path


def library_versions() -> dict:
    """Versions of Python and the libraries a result depends on."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in _VERSIONED:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    out["torch_threads"] = torch.get_num_threads()
    return out


def write_versions(run_dir: str | Path) -> None:
    write_json(Path(run_dir) / "versions.json", library_versions())


def save_model(run_dir: str | Path, model, classes: list[str], head_cfg: dict, extra: dict | None = None) -> Path:
    """Atomically write ``model.pt`` for a :class:`prodclass.models.heads.Classifier`.

    Args:
        model: the Classifier (its whole state_dict is saved: ~18 MB for EfficientNet-Lite0).
        classes: class names, index = logit position.
        head_cfg: ``{"kind", "hidden_dim", "dropout"}`` to rebuild the head.
        extra: more keys for the checkpoint dict (epoch, metrics, ...).
    """
    ckpt = {
        "format_version": FORMAT_VERSION,
        "backbone": model.backbone.name,
        "head": dict(head_cfg),
        "classes": list(classes),
        "preprocessing": model.backbone.preprocessing.to_dict(),
        "state_dict": model.state_dict(),
        **(extra or {}),
    }
    path = Path(run_dir) / MODEL_FILE
    save_torch(path, ckpt)
    return path


def load_model(path: str | Path):
    """Rebuild the Classifier saved by :func:`save_model`.

    Args:
        path: a run directory or a ``model.pt`` file.

    Returns:
        ``(model, ckpt)``: the Classifier in eval mode, and the checkpoint dict (without the
        state_dict) holding ``classes``, ``preprocessing``, ``backbone``, ``head``.

    Raises:
        FileNotFoundError: no model.pt there. ValueError: an unknown format version.
    """
    from prodclass.features.backbones import create_backbone
    from prodclass.models.heads import Classifier, create_head
    from prodclass.preprocess import Preprocessing

    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no model file (is {path} a prodclass run directory?)")
    ckpt = torch.load(file, map_location="cpu", weights_only=False)
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: model format {ckpt.get('format_version')!r}, expected {FORMAT_VERSION}")
    backbone = create_backbone(ckpt["backbone"], pretrained=False,
                               preprocessing=Preprocessing.from_dict(ckpt["preprocessing"]))
    head_cfg = ckpt["head"]
    head = create_head(head_cfg["kind"], backbone.embed_dim, len(ckpt["classes"]),
                       head_cfg.get("hidden_dim", 256), head_cfg.get("dropout", 0.0))
    model = Classifier(backbone, head)
    model.load_state_dict(ckpt.pop("state_dict"))
    return model.eval(), ckpt


def read_optional(run_dir: str | Path, name: str) -> dict:
    """A JSON file of the run directory, or ``{}`` when it does not exist."""
    p = Path(run_dir) / name
    return read_json(p) if p.is_file() else {}
