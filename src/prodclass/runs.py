"""The run directory and its one owner, :class:`RunDir`: no other module spells a run file name.

::

    runs/<name>-<YYYYmmdd-HHMMSS>/
      config.yaml            resolved config (defaults filled in)
      versions.json          Python and library versions, platform
      dataset.parquet        curated rows with label and split (the stored split)
      class_map.json         {"classes": [...]}: class id -> name
      class_counts.csv/.png  images per class before/after curation, per split
      model.safetensors      weights of the whole Classifier (safetensors: loading runs no code)
      model.json             what rebuilds it: backbone, head, classes, preprocessing, format version
      history.json           per-epoch losses/accuracies (stage "head", "finetune", ...)
      metrics.json           test metrics (+ "embedding", "timing", calibration, abstention sections)
      per_class.csv          per-class precision/recall/F1/support, worst first
      confusion_matrix.png
      predictions_{val,test}.parquet   image_path, item_id, y_true, y_pred, logits (list of C)
      calibration.json       {"temperature": T, ...}
      abstention.json        {"threshold": t, ...}
      report.html            the run report
      model.onnx (+ .json sidecar), model.int8.onnx (+ .json)   exports (prodclass export)
      finetune_last.pt       per-epoch fine-tuning checkpoint (resume); removed when the run ends

Model files of format version 1 (``model.pt``, a ``torch.save`` dict) are not loaded any more: the
format can execute code when read. ``prodclass migrate RUN_DIR`` converts a run you trust, reading
the old file with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from prodclass.io import read_json, save_figure, save_torch, write_bytes, write_dataframe, write_json, write_text

MODEL_FORMAT = "prodclass-model"
FORMAT_VERSION = 2
SPLITS = ("train", "val", "test")
_VERSIONED = ("prodclass", "torch", "torchvision", "timm", "numpy", "pandas", "scikit-learn", "Pillow",
              "onnxruntime", "safetensors")


class RunDirError(ValueError):
    """A run directory (or a file in it) that cannot be used; the message names the file."""


class RunDir:
    """A run directory: the path of every file of the layout above and its typed read/write.

    Writes are atomic (:mod:`prodclass.io`); reads of a missing or malformed file raise
    :class:`RunDirError` naming it, except the ``read_optional_*`` ones, which give ``{}``.

    Args:
        path: the directory (it need not exist yet; :meth:`create` makes a new one).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @classmethod
    def create(cls, output_dir: str | Path, name: str) -> "RunDir":
        """Make ``output_dir/<name>-<timestamp>`` (a ``-N`` suffix is added if it exists)."""
        base = Path(output_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, i = base, 1
        while path.exists():
            path, i = Path(f"{base}-{i}"), i + 1
        path.mkdir(parents=True)
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """An existing run directory that holds a model.

        Raises:
            RunDirError: ``path`` is not a directory, or has no model (names the migration
                command for a format-1 run).
        """
        run = cls(path)
        if not run.path.is_dir():
            raise RunDirError(f"{run.path}: not a run directory (give the folder `prodclass run` wrote)")
        run.check_model()
        return run

    # ------------------------------------------------------------------ file names (the only ones)
    config_file = property(lambda self: self.path / "config.yaml")
    versions_file = property(lambda self: self.path / "versions.json")
    dataset_file = property(lambda self: self.path / "dataset.parquet")
    class_map_file = property(lambda self: self.path / "class_map.json")
    class_counts_file = property(lambda self: self.path / "class_counts.csv")
    class_counts_plot = property(lambda self: self.path / "class_counts.png")
    weights_file = property(lambda self: self.path / "model.safetensors")
    model_meta_file = property(lambda self: self.path / "model.json")
    legacy_model_file = property(lambda self: self.path / "model.pt")
    history_file = property(lambda self: self.path / "history.json")
    metrics_file = property(lambda self: self.path / "metrics.json")
    per_class_file = property(lambda self: self.path / "per_class.csv")
    confusion_plot = property(lambda self: self.path / "confusion_matrix.png")
    calibration_file = property(lambda self: self.path / "calibration.json")
    abstention_file = property(lambda self: self.path / "abstention.json")
    report_file = property(lambda self: self.path / "report.html")
    finetune_checkpoint = property(lambda self: self.path / "finetune_last.pt")
    head_checkpoint = property(lambda self: self.path / "head_best.pt")

    def predictions_file(self, split: str) -> Path:
        """``predictions_<split>.parquet`` (``split`` in val, test)."""
        return self.path / f"predictions_{split}.parquet"

    def onnx_file(self, int8: bool = False) -> Path:
        """The ONNX export: ``model.onnx`` or ``model.int8.onnx``."""
        return self.path / ("model.int8.onnx" if int8 else "model.onnx")

    def onnx_sidecar(self, int8: bool = False) -> Path:
        """The export's JSON sidecar: ``model.onnx.json`` / ``model.int8.onnx.json``."""
        return sidecar_path(self.onnx_file(int8))

    # ------------------------------------------------------------------ config, versions, dataset
    def write_config(self, yaml_text: str) -> None:
        write_text(self.config_file, yaml_text)

    def read_config(self):
        """The stored resolved config as a :class:`prodclass.config.RunConfig`."""
        from prodclass.config import ConfigError, load_config

        if not self.config_file.is_file():
            raise RunDirError(f"{self.config_file}: missing; is {self.path} a prodclass run directory?")
        try:
            return load_config(self.config_file)
        except ConfigError as e:
            raise RunDirError(str(e)) from None

    def write_versions(self) -> None:
        write_json(self.versions_file, library_versions())

    def write_dataset(self, table: pd.DataFrame, classes: list[str], counts: pd.DataFrame) -> None:
        """The curated rows with their split, the class map and the class counts."""
        write_dataframe(self.dataset_file, table)
        write_json(self.class_map_file, {"classes": list(classes)})
        write_dataframe(self.class_counts_file, counts)

    def read_dataset(self) -> tuple[pd.DataFrame, list[str], pd.DataFrame | None]:
        """``(table, classes, counts)`` as :meth:`write_dataset` stored them (counts may be None)."""
        self._require(self.dataset_file, self.class_map_file)
        counts = pd.read_csv(self.class_counts_file) if self.class_counts_file.is_file() else None
        return pd.read_parquet(self.dataset_file), self.read_classes(), counts

    def has_dataset(self) -> bool:
        return self.dataset_file.is_file() and self.class_map_file.is_file()

    def read_classes(self) -> list[str]:
        return self._json(self.class_map_file)["classes"]

    def read_class_counts(self) -> pd.DataFrame | None:
        return pd.read_csv(self.class_counts_file) if self.class_counts_file.is_file() else None

    # ------------------------------------------------------------------ model
    def write_model(self, state_dict: dict, meta: dict) -> None:
        """Weights to ``model.safetensors``, then ``meta`` (+ format) to ``model.json``.

        Args:
            state_dict: name → tensor (made contiguous and moved to the CPU here).
            meta: JSON-able description that rebuilds the network (backbone, head, classes,
                preprocessing, ...).
        """
        from safetensors.torch import save

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        write_bytes(self.weights_file, save(tensors))
        write_json(self.model_meta_file, {"format": MODEL_FORMAT, "format_version": FORMAT_VERSION, **meta})
        self.legacy_model_file.unlink(missing_ok=True)

    def check_model(self) -> dict:
        """``model.json`` after checking the model files are there and of this format.

        Raises:
            RunDirError: no model; a format-1 ``model.pt`` (names ``prodclass migrate``); an
                unknown format or version.
        """
        if not self.model_meta_file.is_file() and self.legacy_model_file.is_file():
            raise RunDirError(f"{self.legacy_model_file}: model format 1 (torch.save) is no longer loaded because "
                              f"reading it can run code; convert a run you trust: prodclass migrate {self.path}")
        self._require(self.model_meta_file, self.weights_file)
        meta = self._json(self.model_meta_file)
        if meta.get("format") != MODEL_FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise RunDirError(f"{self.model_meta_file}: model format {meta.get('format')!r} version "
                              f"{meta.get('format_version')!r}, expected {MODEL_FORMAT!r} {FORMAT_VERSION}")
        return meta

    def read_model(self) -> tuple[dict, dict]:
        """``(state_dict, meta)``: tensors from ``model.safetensors`` and ``model.json``.

        Raises:
            RunDirError: as :meth:`check_model`, or weights that are not a safetensors file.
        """
        from safetensors.torch import load

        meta = self.check_model()
        try:
            state = load(self.weights_file.read_bytes())
        except Exception as e:  # safetensors raises its own SafetensorError for a foreign file
            raise RunDirError(f"{self.weights_file}: not a safetensors weights file ({type(e).__name__}: "
                              f"{str(e)[:120]})") from None
        return state, meta

    def migrate_legacy_model(self) -> dict:
        """Convert a format-1 ``model.pt`` to ``model.safetensors`` + ``model.json``.

        The old file is read with ``torch.load(weights_only=True)``: only tensors and plain
        containers are rebuilt, so a file crafted to run code is refused, not run.

        Returns:
            The new ``model.json`` content.

        Raises:
            RunDirError: no ``model.pt``, or a file ``weights_only`` loading refuses.
        """

        if not self.legacy_model_file.is_file():
            raise RunDirError(f"{self.legacy_model_file}: missing; nothing to migrate")
        ckpt = _load_plain(self.legacy_model_file, "cpu", "a prodclass format-1 model")
        if not isinstance(ckpt, dict) or ckpt.get("format_version") != 1 or "state_dict" not in ckpt:
            raise RunDirError(f"{self.legacy_model_file}: not a prodclass format-1 model file")
        state = ckpt.pop("state_dict")
        ckpt.pop("format_version")
        self.write_model(state, ckpt)
        return self.check_model()

    # ------------------------------------------------------------------ training records
    def write_history(self, history: list[dict]) -> None:
        write_json(self.history_file, history)

    def read_history(self) -> list[dict]:
        return self._optional(self.history_file) or []

    def write_metrics(self, metrics: dict) -> None:
        """``metrics.json``: written once per run, by :func:`prodclass.pipeline.run`."""
        write_json(self.metrics_file, metrics)

    def read_metrics(self) -> dict:
        self._require(self.metrics_file)
        return self._json(self.metrics_file)

    def write_per_class(self, table: pd.DataFrame) -> None:
        write_dataframe(self.per_class_file, table)

    def write_figure(self, path: Path, fig) -> None:
        """Save a matplotlib figure to one of this run's plot files (and close it)."""
        save_figure(path, fig, dpi=100)

    def write_predictions(self, split: str, rows: pd.DataFrame, y_true: np.ndarray, logits: np.ndarray) -> None:
        """One split's predictions: ``image_path, item_id, y_true, y_pred, logits`` (float32 list of
        length C per row; softmax them, after temperature scaling, for probabilities)."""
        write_dataframe(self.predictions_file(split), pd.DataFrame({
            "image_path": rows["image_path"].to_numpy(), "item_id": rows["item_id"].to_numpy(),
            "y_true": np.asarray(y_true), "y_pred": logits.argmax(1), "logits": list(logits.astype(np.float32)),
        }))

    def read_predictions(self, split: str = "test") -> tuple[pd.DataFrame, np.ndarray]:
        """``predictions_<split>.parquet``: the table and its logits as float32 ``(N, C)``."""
        self._require(self.predictions_file(split))
        t = pd.read_parquet(self.predictions_file(split))
        return t, np.stack(t["logits"].to_numpy()).astype(np.float32)

    def write_calibration(self, calibration: dict) -> None:
        write_json(self.calibration_file, calibration)

    def read_calibration(self) -> dict:
        """``calibration.json``, or ``{}`` when the run has none."""
        return self._optional(self.calibration_file)

    def write_abstention(self, abstention: dict) -> None:
        write_json(self.abstention_file, abstention)

    def read_abstention(self) -> dict:
        """``abstention.json``, or ``{}`` when the run has none."""
        return self._optional(self.abstention_file)

    def read_versions(self) -> dict:
        return self._optional(self.versions_file)

    def write_report(self, html: str) -> None:
        write_text(self.report_file, html)

    # ------------------------------------------------------------------ exports and checkpoints
    def write_onnx(self, data: bytes, sidecar: dict, int8: bool = False) -> None:
        write_bytes(self.onnx_file(int8), data)
        write_json(self.onnx_sidecar(int8), sidecar)

    def save_checkpoint(self, path: Path, ckpt: dict) -> None:
        """Atomically ``torch.save`` a resume checkpoint (only for ``finetune_checkpoint``/``head_checkpoint``)."""
        save_torch(path, ckpt)

    def load_checkpoint(self, path: Path, map_location="cpu") -> dict:
        """Read a resume checkpoint with ``torch.load(weights_only=True)`` (no code can run).

        Raises:
            RunDirError: a file that is not such a checkpoint (names it).
        """
        return _load_plain(path, map_location, "a prodclass checkpoint")

    # ------------------------------------------------------------------ helpers
    def _require(self, *files: Path) -> None:
        for f in files:
            if not f.is_file():
                raise RunDirError(f"{f}: missing; is {self.path} a complete prodclass run directory?")

    def _json(self, file: Path) -> Any:
        try:
            return read_json(file)
        except (OSError, ValueError) as e:
            raise RunDirError(f"{file}: unreadable JSON ({e})") from None

    def _optional(self, file: Path) -> Any:
        return self._json(file) if file.is_file() else {}


def _load_plain(path: Path, map_location, what: str):
    """``torch.load(weights_only=True)``: tensors, numbers, strings and containers only.

    Raises:
        RunDirError: anything else (an object that would need code to rebuild is refused, not run).
    """
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on the file's protocol version
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = "it holds objects other than tensors and plain data, which could run code when loaded"
        if type(e).__name__ != "UnpicklingError":  # the weights-only loader met a forbidden object
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        raise RunDirError(f"{path}: refused as {what} ({reason})") from None


def sidecar_path(onnx_path: str | Path) -> Path:
    """The JSON sidecar of an ONNX export: ``model.onnx`` → ``model.onnx.json``."""
    p = Path(onnx_path)
    return p.with_name(p.name + ".json")


def library_versions() -> dict:
    """Versions of Python and the libraries a result depends on."""
    import torch

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in _VERSIONED:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    out["torch_threads"] = torch.get_num_threads()
    return out
