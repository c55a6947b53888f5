"""The Predictor: images → top-k labels with calibrated probabilities and an abstain flag.

One object serves the CLI, the REST API, the web demo and batch jobs. It needs only a run
directory (``model.pt`` + optional ``calibration.json``/``abstention.json``) or an ONNX export
with its JSON sidecar (``model.onnx`` + ``model.onnx.json``, written by :mod:`prodclass.serving.export`).
Two interchangeable backends turn a preprocessed float32 ``(B, 3, H, W)`` batch into ``(B, C)``
logits: eager torch (:class:`TorchBackend`) and ONNX Runtime (:class:`OnnxBackend`, the fast
one on CPU). Images are decoded and resized by :class:`prodclass.preprocess.Preprocessing` -- the
function training used -- on a small thread pool, one batch ahead of the network.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from prodclass.preprocess import ImageError, ImageSource, Preprocessing

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"


def sidecar_path(onnx_path: str | Path) -> Path:
    """The JSON sidecar of an ONNX export: ``model.onnx`` → ``model.onnx.json``."""
    p = Path(onnx_path)
    return p.with_name(p.name + ".json")


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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


class TorchBackend:
    """Eager PyTorch: float32 ``(B, 3, H, W)`` ndarray → float32 ``(B, C)`` logits ndarray.

    The model runs in channels-last memory format (~1.7x faster on CPU, measured in
    :mod:`prodclass.features.embeddings`) under ``torch.inference_mode``.
    """

    name = "torch"

    def __init__(self, model, device: str = "cpu"):
        import torch

        self.model = model.eval().to(device=device, memory_format=torch.channels_last)
        self.device = torch.device(device)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device).contiguous(memory_format=torch.channels_last)
            return self.model(x).float().cpu().numpy()


class OnnxBackend:
    """ONNX Runtime on CPU: float32 ``(B, 3, H, W)`` ndarray → float32 ``(B, C)`` logits ndarray.

    Session options (measured on a 2-core AMD EPYC, see ``benchmarks/bench_inference.py``): all
    graph optimisations (constant folding, Conv+BN+ReLU6 fusion, NCHWc blocked layout),
    sequential execution, one intra-op thread per available core, no inter-op pool, and no
    spin-waiting: idle intra-op threads yield their core to the decoding threads and to other
    processes (``ort_options`` in ``benchmarks/results/inference.json`` compares the choices).
    A batch runs ``micro_batch`` images at a time: EfficientNet-Lite0's early activations for 4
    images (~6 MB) stay in the caches where 32 images' (~50 MB) do not, ~1.3x more images/s.

    Args:
        path: the ``.onnx`` file, or the serialised model's bytes.
        threads: intra-op threads (default: the cores this process may use).
        spin: let idle intra-op threads spin-wait (lower latency on an otherwise idle machine).
        micro_batch: most images per ``session.run`` call.
    """

    name = "onnx"

    def __init__(self, path: str | Path | bytes, threads: int | None = None, spin: bool = False, micro_batch: int = 4):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = threads or cpu_count()
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        model = path if isinstance(path, bytes) else str(path)
        self.session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.micro_batch = micro_batch

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, np.float32)
        outs = [self.session.run(None, {self.input_name: x[i:i + self.micro_batch]})[0]
                for i in range(0, len(x), self.micro_batch)]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)


class Predictor:
    """Classify product images with a trained model.

    Args:
        model: a torch module ``(B, 3, H, W)`` → ``(B, C)`` logits (wrapped in :class:`TorchBackend`),
            or any callable mapping a float32 ndarray batch to an ndarray of logits
            (e.g. :class:`OnnxBackend`).
        classes: C class names.
        preprocessing: the training preprocessing.
        temperature: logits are divided by it before the softmax (1.0 = uncalibrated).
        threshold: top-1 probability under which a prediction abstains (None: never).
        meta: free-form description (run directory, backbone, backend).
        workers: threads decoding and resizing images.
    """

    def __init__(self, model, classes: Sequence[str], preprocessing: Preprocessing,
                 temperature: float = 1.0, threshold: float | None = None, meta: dict | None = None,
                 workers: int = 2):
        self.backend = model if not _is_torch_module(model) else TorchBackend(model)
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.temperature = float(temperature)
        self.threshold = None if threshold is None else float(threshold)
        self.meta = {"backend": getattr(self.backend, "name", type(self.backend).__name__), **(meta or {})}
        self.workers = workers

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu", backend: str = "torch",
                 threads: int | None = None) -> "Predictor":
        """Load from a run directory alone (``model.pt`` + optional calibration/abstention).

        Args:
            backend: ``torch`` (``model.pt``), ``onnx`` (the run's ``model.onnx`` export; class
                map and preprocessing from its sidecar), ``onnx-int8`` (``model.int8.onnx``) or
                ``auto`` (``onnx`` when the export exists, else ``torch``).
                Temperature and threshold always come from the run directory's current
                ``calibration.json``/``abstention.json``.
            threads: ONNX Runtime intra-op threads.

        Raises:
            FileNotFoundError: no ``model.pt`` (or ``model.onnx`` for ``backend="onnx"``).
            ValueError: unknown backend or model format.
        """
        from prodclass.runs import read_optional

        run_dir = Path(run_dir)
        if backend == "auto":
            backend = "onnx" if (run_dir / ONNX_FILE).is_file() else "torch"
        cal = read_optional(run_dir, "calibration.json")
        abst = read_optional(run_dir, "abstention.json")
        if backend in ("onnx", "onnx-int8"):
            p = cls.from_onnx(run_dir / (ONNX_FILE if backend == "onnx" else INT8_FILE), threads=threads)
            p.temperature = float(cal.get("temperature", 1.0))
            p.threshold = abst.get("threshold")
            p.meta["run_dir"] = str(run_dir)
            return p
        if backend != "torch":
            raise ValueError(f"unknown backend {backend!r} (expected torch, onnx, onnx-int8 or auto)")
        from prodclass.runs import load_model

        model, ckpt = load_model(run_dir)
        return cls(TorchBackend(model, device), ckpt["classes"], model.backbone.preprocessing,
                   temperature=cal.get("temperature", 1.0), threshold=abst.get("threshold"),
                   meta={"run_dir": str(run_dir), "backbone": ckpt["backbone"]})

    @classmethod
    def from_onnx(cls, path: str | Path, threads: int | None = None) -> "Predictor":
        """Load an ONNX export alone: ``path`` (``model.onnx``) and its sidecar ``model.onnx.json``
        (classes, preprocessing, temperature, threshold; see :func:`prodclass.serving.export.export_onnx`).

        Raises:
            FileNotFoundError: the model or its sidecar is missing.
            ValueError: a sidecar of another format, or whose class count differs from the model's.
        """
        from prodclass.io import read_json

        path = Path(path)
        if path.is_dir():
            path = path / ONNX_FILE
        side = sidecar_path(path)
        for f in (path, side):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing (write it with `prodclass export RUN_DIR`)")
        meta = read_json(side)
        if meta.get("format") != "prodclass-onnx":
            raise ValueError(f"{side}: not a prodclass ONNX sidecar (format {meta.get('format')!r})")
        backend = OnnxBackend(path, threads=threads)
        n_out = backend.session.get_outputs()[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(meta["classes"]):
            raise ValueError(f"{side}: {len(meta['classes'])} classes, but {path} outputs {n_out} logits")
        return cls(backend, meta["classes"], Preprocessing.from_dict(meta["preprocessing"]),
                   temperature=meta.get("temperature", 1.0), threshold=meta.get("threshold"),
                   meta={"onnx": str(path), "backbone": meta.get("backbone")})

    @property
    def model(self):
        """The torch module (torch backend only; ``None`` for ONNX)."""
        return getattr(self.backend, "model", None)

    @property
    def device(self):
        """The torch device of the torch backend (``cpu`` for ONNX)."""
        import torch

        return getattr(self.backend, "device", torch.device("cpu"))

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 ``(B, 3, H, W)`` preprocessed images → float32 ``(B, C)`` raw logits."""
        return np.asarray(self.backend(batch), np.float32)

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        """float32 ``(B, 3, H, W)`` preprocessed images → ``(B, C)`` calibrated probabilities
        (softmax of logits / temperature)."""
        z = self.predict_logits(batch) / self.temperature
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)

    def predict(self, images: Sequence[ImageSource], top_k: int = 5, batch_size: int = 32) -> list[Prediction]:
        """Classify images (paths, bytes or PIL images); undecodable ones get ``error`` set.

        Returns:
            One :class:`Prediction` per input, in input order.
        """
        return list(self.iter_predict(images, top_k, batch_size))

    def iter_predict(self, images: Sequence[ImageSource], top_k: int = 5, batch_size: int = 32) -> Iterator[Prediction]:
        """Like :meth:`predict`, yielding one :class:`Prediction` per input, in order, as batches
        finish. While the network runs batch ``i``, the thread pool decodes batches ``i+1``
        and ``i+2`` (PIL releases the GIL while decoding and resizing)."""
        top_k = min(top_k, len(self.classes))
        batches = [range(s, min(s + batch_size, len(images))) for s in range(0, len(images), batch_size)]
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            pending = [pool.map(self._safe_preprocess, [images[i] for i in b]) for b in batches[:2]]
            for bi, b in enumerate(batches):
                arrays = list(pending[bi])
                pending[bi] = None
                if bi + 2 < len(batches):
                    pending.append(pool.map(self._safe_preprocess, [images[i] for i in batches[bi + 2]]))
                yield from self._predict_arrays(arrays, top_k)

    def _predict_arrays(self, arrays: list, top_k: int) -> list[Prediction]:
        results = [Prediction(error=a) if isinstance(a, str) else None for a in arrays]
        ok = [i for i, a in enumerate(arrays) if not isinstance(a, str)]
        if ok:
            probs = self.predict_proba(np.stack([arrays[i] for i in ok]))
            order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
            top = np.take_along_axis(probs, order, 1)
            for i, o, p in zip(ok, order, top):
                results[i] = Prediction(labels=[self.classes[j] for j in o], probs=p.astype(float).tolist(),
                                        abstain=self.threshold is not None and float(p[0]) < self.threshold)
        return results

    def _safe_preprocess(self, src: ImageSource) -> np.ndarray | str:
        try:
            return self.preprocessing(src)
        except ImageError as e:
            return str(e)
        except Exception as e:  # a batch job must survive anything one image can do
            return f"{_name(src)}: {type(e).__name__}: {e}"


def _name(src) -> str:
    return str(src) if isinstance(src, (str, os.PathLike)) else f"<{type(src).__name__}>"


def _is_torch_module(obj) -> bool:
    torch = sys.modules.get("torch")  # not imported yet: obj cannot be a torch module (ONNX stays torch-free)
    return torch is not None and isinstance(obj, torch.nn.Module)
