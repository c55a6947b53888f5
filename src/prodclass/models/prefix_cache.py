"""The frozen-prefix feature cache: the frozen blocks' output, computed once per view and stored.

The frozen blocks are a fixed function, so their output for a given input never changes. Stage 2
runs them once per *view* of every image (view 0 the unaugmented image, views 1..K-1 random
augmentations, :mod:`prodclass.models.augment`) and stores the activations; its epochs then train
only the tail. Three pieces:

* :func:`prefix_runner`: the prefix as a backend of :mod:`prodclass.inference` (float32
  ``(B, 3, S, S)`` array → float32 ``(B, C, H, W)`` array): ONNX Runtime through
  :class:`prodclass.inference.OnnxBackend` (~2x eager torch on 2 cores, see
  ``benchmarks/bench_finetune.py --speed``), checked against torch, or
  :class:`prodclass.inference.TorchBackend`. Both run on their own copy of the model.
* :func:`prefix_features`: runs it over a dataset's views through
  :func:`prodclass.inference.iter_outputs` into an fp16 ``.npy`` memmap; resumable.
* :func:`feature_cache_key`: the folder name, a hash of everything the activations depend on.

Disk: N·K·C·H·W·2 bytes (abo-small, 224 px, last 3 blocks: 2938 × 8 × 112×14×14 → 1 GB).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from prodclass.inference import Backend, OnnxBackend, TorchBackend, iter_outputs
from prodclass.io import read_json, write_json
from prodclass.models.augment import IMPL as AUGMENT_IMPL
from prodclass.models.split import Prefix

PARITY_TOLERANCE = 1e-3  # of the activations' largest magnitude (at least 1)


def export_prefix(model, k: int, size: int) -> bytes:
    """ONNX bytes (opset 17, dynamic batch, input ``x``, output ``h``) of blocks ``[:k]`` of a copy
    of ``model`` on the CPU, in eval mode, with frozen weights folded in as constants."""
    prefix = Prefix(copy.deepcopy(model), k).to("cpu", memory_format=torch.contiguous_format)
    prefix.eval().requires_grad_(False)  # the tracer only folds in weights that need no gradient
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(prefix, (torch.zeros(1, 3, size, size),), buf, input_names=["x"], output_names=["h"],
                          dynamic_axes={"x": {0: "batch"}}, opset_version=17, dynamo=False)
    return buf.getvalue()


def prefix_runner(model, k: int, engine: str = "torch", device: str | torch.device = "cpu") -> Backend:
    """The frozen prefix (blocks ``[:k]``) of a Classifier as a backend.

    Args:
        model: a :class:`prodclass.models.heads.Classifier`; not changed (the backends copy it).
        k: split index (:meth:`prodclass.models.policy.BackboneFinetuning.split_index`).
        engine: ``onnxruntime`` (CPU) or ``torch`` (eager, channels-last, on ``device``).
        device: for ``torch``.

    Returns:
        float32 ``(B, 3, S, S)`` ndarray → float32 ``(B, C, H, W)`` ndarray.

    Raises:
        RuntimeError: ONNX Runtime's output differs from torch's on a random batch by more than
            1e-3 of the activations' magnitude (use ``finetune.prefix_engine: torch``).
        ValueError: an unknown engine.
    """
    if engine not in ("torch", "onnxruntime"):
        raise ValueError(f"finetune.prefix_engine={engine!r}: expected torch or onnxruntime")
    reference = TorchBackend(Prefix(model, k), str(device) if engine == "torch" else "cpu")
    if engine == "torch":
        return reference
    size = model.backbone.preprocessing.input_size
    backend = OnnxBackend(export_prefix(model, k, size), threads=torch.get_num_threads())
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).numpy()
    ref = reference(x)
    diff = float(np.abs(backend(x) - ref).max())
    if diff > PARITY_TOLERANCE * max(1.0, float(np.abs(ref).max())):
        raise RuntimeError(f"onnxruntime prefix differs from torch by {diff:.2e}; use finetune.prefix_engine=torch")
    return backend


def _open_partial(partial: Path, done_file: Path, shape: tuple) -> tuple[np.ndarray, int]:
    """The work-in-progress memmap and how many rows of it are done (0: a new file)."""
    if partial.is_file() and done_file.is_file():
        mm = np.lib.format.open_memmap(partial, mode="r+")
        if mm.shape == shape:
            return mm, int(read_json(done_file)["done"])
        del mm
    partial.parent.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=shape), 0


def prefix_features(run: Backend, ds, path: str | Path, batch_size: int = 32, workers: int = 2,
                    progress: bool = True, flush_every: int = 512) -> np.ndarray:
    """Run the frozen prefix over every item of ``ds`` once and store the result.

    Args:
        run: the prefix, from :func:`prefix_runner` (or any float32 ndarray → ndarray callable).
        ds: a :class:`prodclass.models.data.ImageDataset` with ``views=K`` (N·K items, view 0
            unaugmented).
        path: the ``.npy`` file; if it exists it is returned as it is. Work in progress lives in
            ``<path>.partial`` with a ``.done.json`` count (flushed every ``flush_every`` rows), so an
            interrupted pass continues where it stopped; the finished file is moved into place atomically.
        batch_size: items per ``run`` call.
        workers: threads decoding and augmenting images, two batches ahead.
        progress: show a progress bar.

    Returns:
        Read-only memmap, float16 ``(N, K, C, H, W)``.

    Raises:
        prodclass.preprocess.ImageError: an image that cannot be decoded (names the file).
    """
    from tqdm.auto import tqdm

    path = Path(path)
    if path.is_file():
        return np.load(path, mmap_mode="r")
    partial, done_file = path.with_suffix(".npy.partial"), path.with_suffix(".done.json")
    n, views = len(ds.paths), ds.views
    shape = run(ds.image(0)[None]).shape[1:]
    mm, done = _open_partial(partial, done_file, (n, views, *shape))
    flat, start, last_flush = mm.reshape(n * views, *shape), done, done
    items = range(start, n * views)
    with tqdm(total=n * views, initial=done, desc="frozen-prefix features", unit="view", disable=not progress) as bar:
        for out in iter_outputs(run, items, ds.image, batch_size=batch_size, workers=workers, strict=True):
            flat[start + out.index] = out.outputs.astype(np.float16)
            done = start + int(out.index[-1]) + 1
            bar.update(len(out.index))
            if done - last_flush >= flush_every:
                mm.flush()
                write_json(done_file, {"done": done})
                last_flush = done
    mm.flush()
    del flat, mm
    os.replace(partial, path)
    done_file.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")


def feature_cache_key(model, k: int, cfg, paths: Sequence[str], weights: str | None, views: int,
                      engine: str) -> str:
    """Folder name for stored activations: a hash of everything they depend on — backbone,
    weights and preprocessing (the embedding cache's key), split point ``k``, engine, views, seed,
    the augmentation settings and implementation (``augment_impl``) — and the image *contents*.

    Args:
        model: the Classifier; cfg: its :class:`prodclass.config.FinetuneConfig`.
        paths: the split's image files (hashed by content, so renames keep the cache).
        weights: the user weights file (``model.weights``), or ``None`` for the packaged ones.
    """
    from prodclass.features.embeddings import EmbeddingCache
    from prodclass.io import file_sha1

    emb_key = EmbeddingCache.for_backbone("", model.backbone, weights).dir.name  # backbone+weights+preprocessing
    augment = {**cfg.augment.model_dump(mode="json"), "augment_impl": AUGMENT_IMPL} if views > 1 else None
    h = hashlib.sha1(json.dumps({"backbone": emb_key, "k": k, "views": views, "engine": engine, "seed": cfg.seed,
                                 "augment": augment}, sort_keys=True).encode())
    for p in paths:
        h.update(file_sha1(p).encode())
    return f"{emb_key}-k{k}-{h.hexdigest()[:16]}"
