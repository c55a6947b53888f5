"""The Predictor: images → top-k labels with calibrated probabilities and an abstain flag.

One object serves the CLI, the REST API, the web demo, batch jobs and the evaluation of a run
(the pipeline computes a run's test metrics with the Predictor it loads from the run directory,
so what the report says is what ``serve`` does). It needs only a run directory (the safe model
files + optional calibration/abstention) or an ONNX export with its JSON sidecar. Images go
through :func:`prodclass.inference.iter_outputs` — the one batched images → logits path — with a
torch or ONNX Runtime backend, and :func:`prodclass.inference.softmax` turns logits into
calibrated probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from prodclass.inference import OnnxBackend, TorchBackend, as_backend, iter_outputs, predict_outputs, softmax
from prodclass.io import read_json
from prodclass.preprocess import ImageSource, Preprocessing
from prodclass.runs import RunDir, RunDirError, sidecar_path

SIDECAR_FORMAT = "prodclass-onnx"
BACKENDS = ("torch", "onnx", "onnx-int8", "auto")


@dataclass
class Prediction:
    """One image's result.

    Attributes:
        labels: top-k class names, most probable first.
        probs: their probabilities (after temperature scaling), same order.
        abstain: True when the top probability is under the run's threshold (send to review).
        error: why the image could not be classified (then labels/probs are empty).
    """

    labels: list[str] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    abstain: bool = False
    error: str | None = None

    def to_dict(self) -> dict:
        return {"labels": self.labels, "probs": [round(p, 6) for p in self.probs], "abstain": self.abstain,
                "error": self.error}


class Predictor:
    """Classify product images with a trained model.

    Args:
        model: a torch module ``(B, 3, H, W)`` → ``(B, C)`` logits (run by a
            :class:`~prodclass.inference.TorchBackend` on its own inference copy), or any callable
            mapping a float32 ndarray batch to an ndarray of logits (e.g. an
            :class:`~prodclass.inference.OnnxBackend`).
        classes: C class names.
        preprocessing: the training preprocessing.
        temperature: logits are divided by it before the softmax (1.0 = uncalibrated).
        threshold: top-1 probability under which a prediction abstains (None: never).
        meta: free-form description (run directory, backbone, backend).
        workers: threads decoding and resizing images.
    """

    def __init__(self, model, classes: Sequence[str], preprocessing: Preprocessing,
                 temperature: float = 1.0, threshold: float | None = None, meta: dict | None = None,
                 workers: int = 2, device: str = "cpu"):
        self.backend = as_backend(model, device)
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.temperature = float(temperature)
        self.threshold = None if threshold is None else float(threshold)
        self.meta = {"backend": getattr(self.backend, "name", type(self.backend).__name__), **(meta or {})}
        self.workers = workers

    @classmethod
    def from_run(cls, run_dir: str | Path | RunDir, device: str = "cpu", backend: str = "torch",
                 threads: int | None = None) -> "Predictor":
        """Load from a run directory alone (the safe model files + optional calibration/abstention).

        Args:
            backend: ``torch`` (``model.safetensors``), ``onnx`` (the run's ONNX export; class map
                and preprocessing from its sidecar), ``onnx-int8`` (the INT8 export) or ``auto``
                (``onnx`` when the export exists, else ``torch``). Temperature and threshold always
                come from the run directory's current calibration and abstention records.
            threads: ONNX Runtime intra-op threads.

        Raises:
            prodclass.runs.RunDirError: not a run directory, no model, a format-1 or foreign model file.
            FileNotFoundError: no ONNX export for ``backend="onnx"``.
            ValueError: unknown backend.
        """
        from prodclass.models.serialization import load_classifier

        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
        run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        if backend == "auto":
            backend = "onnx" if run.onnx_file().is_file() else "torch"
        cal, abst = run.read_calibration(), run.read_abstention()
        if backend == "torch":
            model, meta = load_classifier(RunDir.open(run.path))
            p = cls(TorchBackend(model, device, take=True), meta["classes"], model.backbone.preprocessing,
                    meta={"run_dir": str(run.path), "backbone": meta["backbone"]})
        else:
            p = cls.from_onnx(run.onnx_file(int8=backend == "onnx-int8"), threads=threads)
            p.meta["run_dir"] = str(run.path)
        p.temperature = float(cal.get("temperature", 1.0))
        p.threshold = abst.get("threshold")
        return p

    @classmethod
    def from_onnx(cls, path: str | Path, threads: int | None = None) -> "Predictor":
        """Load an ONNX export alone: ``path`` and its JSON sidecar (classes, preprocessing,
        temperature, threshold; see :func:`prodclass.serving.export.export_onnx`).

        Raises:
            FileNotFoundError: the model or its sidecar is missing.
            ValueError: a sidecar of another format, or whose class count differs from the model's.
        """
        path = Path(path)
        if path.is_dir():
            path = RunDir(path).onnx_file()
        side = sidecar_path(path)
        for f in (path, side):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing (write it with `prodclass export RUN_DIR`)")
        meta = read_json(side)
        if meta.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"{side}: not a prodclass ONNX sidecar (format {meta.get('format')!r})")
        backend = OnnxBackend(path, threads=threads)
        if backend.num_outputs is not None and backend.num_outputs != len(meta["classes"]):
            raise ValueError(f"{side}: {len(meta['classes'])} classes, but {path} outputs {backend.num_outputs} logits")
        return cls(backend, meta["classes"], Preprocessing.from_dict(meta["preprocessing"]),
                   temperature=meta.get("temperature", 1.0), threshold=meta.get("threshold"),
                   meta={"onnx": str(path), "backbone": meta.get("backbone")})

    @property
    def model(self):
        """The torch module (torch backend only; ``None`` for ONNX)."""
        return getattr(self.backend, "model", None)

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 ``(B, 3, H, W)`` preprocessed images → float32 ``(B, C)`` raw logits."""
        return np.asarray(self.backend(batch), np.float32)

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        """float32 ``(B, 3, H, W)`` preprocessed images → ``(B, C)`` calibrated probabilities
        (``softmax(logits / temperature)``)."""
        return softmax(self.predict_logits(batch), self.temperature)

    def logits(self, images: Sequence[ImageSource], batch_size: int = 32, strict: bool = True,
               progress: bool = False) -> tuple[np.ndarray, list[str | None]]:
        """Raw logits of images (paths, bytes, PIL): float32 ``(N, C)`` and N errors (``None`` if fine).

        Raises:
            prodclass.preprocess.ImageError: with ``strict``, an image that cannot be decoded.
        """
        return predict_outputs(self.backend, images, self.preprocessing, batch_size, self.workers, strict,
                               progress, desc="predicting")

    def predict(self, images: Sequence[ImageSource], top_k: int = 5, batch_size: int = 32) -> list[Prediction]:
        """Classify images (paths, bytes or PIL images); undecodable ones get ``error`` set.

        Returns:
            One :class:`Prediction` per input, in input order.
        """
        return list(self.iter_predict(images, top_k, batch_size))

    def iter_predict(self, images: Sequence[ImageSource], top_k: int = 5,
                     batch_size: int = 32) -> Iterator[Prediction]:
        """Like :meth:`predict`, yielding one :class:`Prediction` per input, in order, as batches finish
        (decoding runs two batches ahead of the network, see :func:`prodclass.inference.iter_outputs`)."""
        top_k = min(top_k, len(self.classes))
        for out in iter_outputs(self.backend, images, self.preprocessing, batch_size, self.workers):
            yield from self._predictions(out.outputs, out.errors, top_k)

    def _predictions(self, logits: np.ndarray, errors: list[str | None], top_k: int) -> list[Prediction]:
        ok = [i for i, e in enumerate(errors) if e is None]
        results = [Prediction(error=e) for e in errors]
        if ok:
            probs = softmax(logits[ok], self.temperature)
            order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
            top = np.take_along_axis(probs, order, 1)
            for i, o, p in zip(ok, order, top, strict=True):
                results[i] = Prediction(labels=[self.classes[j] for j in o], probs=p.astype(float).tolist(),
                                        abstain=self.threshold is not None and float(p[0]) < self.threshold)
        return results


__all__ = ["Prediction", "Predictor", "RunDirError", "SIDECAR_FORMAT"]
