"""The Predictor: images → top-k labels with calibrated probabilities and an abstain flag.

One object serves the CLI, the REST API, the web demo and batch jobs. It needs only a run
directory: the model, class map and preprocessing come from ``model.pt``; the temperature
(``calibration.json``) and the abstention threshold (``abstention.json``) when the run has them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .preprocess import ImageError, ImageSource, Preprocessing


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
        model: ``(B, 3, H, W)`` → ``(B, C)`` logits, in eval mode.
        classes: C class names.
        preprocessing: the training preprocessing.
        temperature: logits are divided by it before the softmax (1.0 = uncalibrated).
        threshold: top-1 probability under which a prediction abstains (None: never).
    """

    def __init__(self, model, classes: Sequence[str], preprocessing: Preprocessing,
                 temperature: float = 1.0, threshold: float | None = None, meta: dict | None = None):
        self.model = model.eval()
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.temperature = float(temperature)
        self.threshold = threshold
        self.meta = meta or {}

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu") -> "Predictor":
        """Load from a run directory alone (``model.pt`` + optional calibration/abstention)."""
        from .runs import load_model, read_optional

        model, ckpt = load_model(run_dir)
        cal = read_optional(run_dir, "calibration.json")
        abst = read_optional(run_dir, "abstention.json")
        return cls(model.to(device), ckpt["classes"], model.backbone.preprocessing,
                   temperature=cal.get("temperature", 1.0), threshold=abst.get("threshold"),
                   meta={"run_dir": str(run_dir), "backbone": ckpt["backbone"]})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        """float32 ``(B, 3, H, W)`` preprocessed images → ``(B, C)`` calibrated probabilities."""
        x = torch.from_numpy(batch).to(self.device)
        logits = self.model(x).float() / self.temperature
        return logits.softmax(1).cpu().numpy()

    def predict(self, images: Sequence[ImageSource], top_k: int = 5, batch_size: int = 32) -> list[Prediction]:
        """Classify images (paths, bytes or PIL images); undecodable ones get ``error`` set.

        Returns:
            One :class:`Prediction` per input, in input order.
        """
        top_k = min(top_k, len(self.classes))
        results: list[Prediction] = [Prediction() for _ in images]
        with ThreadPoolExecutor(max_workers=2) as pool:
            for start in range(0, len(images), batch_size):
                idx = list(range(start, min(start + batch_size, len(images))))
                arrays = list(pool.map(self._safe_preprocess, [images[i] for i in idx]))
                ok = [(i, a) for i, a in zip(idx, arrays) if not isinstance(a, str)]
                for i, a in zip(idx, arrays):
                    if isinstance(a, str):
                        results[i].error = a
                if not ok:
                    continue
                probs = self.predict_proba(np.stack([a for _, a in ok]))
                for (i, _), p in zip(ok, probs):
                    order = np.argsort(-p)[:top_k]
                    results[i].labels = [self.classes[j] for j in order]
                    results[i].probs = [float(p[j]) for j in order]
                    results[i].abstain = self.threshold is not None and float(p[order[0]]) < self.threshold
        return results

    def _safe_preprocess(self, src: ImageSource) -> np.ndarray | str:
        try:
            return self.preprocessing(src)
        except ImageError as e:
            return str(e)
