"""The one batched path from images to network outputs, and the one softmax.

Every stage that runs a network over images goes through :func:`iter_outputs`: the embedding
stage (backbone → embeddings), evaluation of a run (classifier → logits), the Predictor behind
batch prediction, the REST API and the demo, export parity checks and the fine-tuning prefix
cache. A *backend* is a callable mapping a float32 ``(B, 3, H, W)`` batch to a float32
``(B, K)`` (or ``(B, C, H, W)``) array:

- :class:`TorchBackend`: eager PyTorch on its own channels-last inference copy of the module
  (~1.7x faster convolutions on CPU); the module it was handed is never changed.
- :class:`OnnxBackend`: ONNX Runtime's CPU provider.

Images are decoded and resized by :class:`prodclass.preprocess.Preprocessing` on a small thread
pool, two batches ahead of the network (Pillow releases the GIL while decoding and resizing).
"""

from __future__ import annotations

import copy
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from prodclass.preprocess import ImageError, ImageSource, Preprocessing

Backend = Callable[[np.ndarray], np.ndarray]


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """float ``(N, C)`` logits → float64 ``(N, C)`` probabilities of ``softmax(logits / T)``.

    Computed as ``exp(z - logsumexp(z))`` (scipy), stable for any logit range. ``T = 1`` is the
    uncalibrated model; the run's ``T`` comes from temperature scaling (Guo et al. 2017).
    """
    from scipy.special import log_softmax

    return np.exp(log_softmax(np.asarray(logits, np.float64) / float(temperature), axis=1))


class TorchBackend:
    """Eager PyTorch: float32 ``(B, 3, H, W)`` ndarray → float32 output ndarray.

    Args:
        module: any ``nn.Module`` (a Classifier gives ``(B, C)`` logits, a Backbone ``(B, D)``
            embeddings). It is deep-copied: the copy is put in eval mode and channels-last
            memory format, so the caller's module keeps its mode, layout and trainability.
        device: ``cpu``, ``cuda``, ``cuda:N``.
        take: the caller hands ``module`` over (it is converted in place instead of copied).
    """

    name = "torch"

    def __init__(self, module, device: str = "cpu", take: bool = False):
        import torch

        self.device = torch.device(device)
        self.model = (module if take else copy.deepcopy(module)).eval().requires_grad_(False)
        self.model.to(device=self.device, memory_format=torch.channels_last)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device)
            return self.model(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy()


class OnnxBackend:
    """ONNX Runtime on CPU: float32 ``(B, 3, H, W)`` ndarray → float32 output ndarray.

    Session options (measured on 2 cores, see ``benchmarks/bench_inference.py``): all graph
    optimisations (constant folding, Conv+BN+ReLU6 fusion, NCHWc blocked layout), sequential
    execution, one intra-op thread per available core, no inter-op pool, and no spin-waiting:
    idle intra-op threads yield their core to the decoding threads and to other processes.
    A batch runs ``micro_batch`` images at a time: EfficientNet-Lite0's early activations for 4
    images (~6 MB) stay in the caches where 32 images' (~50 MB) do not, ~1.3x more images/s.

    Args:
        model: the ``.onnx`` file, or the serialised model's bytes.
        threads: intra-op threads (default: the cores this process may use).
        spin: let idle intra-op threads spin-wait (lower latency on an otherwise idle machine).
        micro_batch: most images per ``session.run`` call.
    """

    name = "onnx"

    def __init__(self, model: str | Path | bytes, threads: int | None = None, spin: bool = False,
                 micro_batch: int = 4):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = threads or cpu_count()
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.micro_batch = micro_batch

    @property
    def num_outputs(self) -> int | None:
        """Size of the output's last axis when the graph fixes it (the class count)."""
        n = self.session.get_outputs()[0].shape[-1]
        return n if isinstance(n, int) else None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, np.float32)
        outs = [self.session.run(None, {self.input_name: x[i:i + self.micro_batch]})[0]
                for i in range(0, len(x), self.micro_batch)]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)


def as_backend(model, device: str = "cpu") -> Backend:
    """A torch module becomes a :class:`TorchBackend`; any other callable is returned as it is."""
    torch = sys.modules.get("torch")  # not imported yet: model cannot be a torch module (ONNX stays torch-free)
    if torch is not None and isinstance(model, torch.nn.Module):
        return TorchBackend(model, device)
    return model


@dataclass
class BatchOutput:
    """One batch of :func:`iter_outputs`.

    Attributes:
        index: positions in the input list, ``(B,)`` int, in input order.
        outputs: float32 ``(B, ...)`` network outputs; rows of failed images are NaN.
        errors: ``B`` entries: ``None``, or why that image could not be read (names the file).
    """

    index: np.ndarray
    outputs: np.ndarray
    errors: list[str | None]


def iter_outputs(backend: Backend, images: Sequence[ImageSource], preprocessing: Preprocessing,
                 batch_size: int = 32, workers: int = 2, strict: bool = False) -> Iterator[BatchOutput]:
    """Run ``backend`` over ``images`` in batches, decoding two batches ahead on ``workers`` threads.

    Args:
        backend: float32 ``(B, 3, H, W)`` → float32 ``(B, ...)``.
        images: paths, raw bytes or PIL images.
        preprocessing: the run's image preprocessing (the one used in training).
        batch_size: images per backend call.
        workers: decoding threads.
        strict: raise on the first unreadable image instead of recording its error.

    Yields:
        :class:`BatchOutput` per batch, in input order.

    Raises:
        prodclass.preprocess.ImageError: with ``strict``, an image that cannot be decoded.
    """
    decode = preprocessing if strict else _safe_decoder(preprocessing)
    batches = [range(s, min(s + batch_size, len(images))) for s in range(0, len(images), batch_size)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = [pool.map(decode, [images[i] for i in b]) for b in batches[:2]]
        for bi, b in enumerate(batches):
            arrays = list(pending[bi])
            pending[bi] = None
            if bi + 2 < len(batches):
                pending.append(pool.map(decode, [images[i] for i in batches[bi + 2]]))
            yield _run_batch(backend, np.asarray(b), arrays)


def predict_outputs(backend: Backend, images: Sequence[ImageSource], preprocessing: Preprocessing,
                    batch_size: int = 32, workers: int = 2, strict: bool = True,
                    progress: bool = False, desc: str = "predicting") -> tuple[np.ndarray, list[str | None]]:
    """All outputs of :func:`iter_outputs` stacked: float32 ``(N, ...)`` and N errors (``None`` if fine).

    Raises:
        ValueError: no images. prodclass.preprocess.ImageError: with ``strict``, an unreadable image.
    """
    from tqdm.auto import tqdm

    if not len(images):
        raise ValueError("no images to run the network on")
    parts, errors = [], []
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress) as bar:
        for out in iter_outputs(backend, images, preprocessing, batch_size, workers, strict):
            parts.append(out.outputs)
            errors += out.errors
            bar.update(len(out.index))
    shape = next((p.shape[1:] for p in parts if p.shape[1:] != (0,)), (0,))  # a batch of only failures has none
    return np.concatenate([p if p.shape[1:] == shape else np.full((len(p), *shape), np.nan, np.float32)
                           for p in parts]), errors


def _run_batch(backend: Backend, index: np.ndarray, arrays: list) -> BatchOutput:
    ok = [i for i, a in enumerate(arrays) if not isinstance(a, str)]
    errors = [a if isinstance(a, str) else None for a in arrays]
    if not ok:
        return BatchOutput(index, np.full((len(arrays), 0), np.nan, np.float32), errors)
    y = np.asarray(backend(np.stack([arrays[i] for i in ok])), np.float32)
    if len(ok) == len(arrays):
        return BatchOutput(index, y, errors)
    out = np.full((len(arrays), *y.shape[1:]), np.nan, np.float32)
    out[ok] = y
    return BatchOutput(index, out, errors)


def _safe_decoder(prep: Preprocessing):
    def decode(src: ImageSource) -> np.ndarray | str:
        try:
            return prep(src)
        except ImageError as e:
            return str(e)
        except Exception as e:  # a batch job must survive anything one image can do
            return f"{_name(src)}: {type(e).__name__}: {e}"

    return decode


def _name(src) -> str:
    return str(src) if isinstance(src, (str, os.PathLike)) else f"<{type(src).__name__}>"
