"""Embedding cache: backbone embeddings keyed by (backbone + weights, preprocessing, image content).

Layout: ``<cache_root>/embeddings/<backbone>-<key>/shard-*.npz``, where ``key`` hashes the
backbone name, its weights file identity and :meth:`Preprocessing.key`. Each shard holds
``hashes`` (SHA-1 of each image file's bytes) and ``embeddings`` (float32 ``(n, D)``) and is
written atomically; shards are flushed every ``flush_every`` new images, so an interrupted
embedding pass keeps what it finished and the next run computes only the rest. Renaming or
moving images does not invalidate the cache; editing a file's bytes does.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from prodclass.inference import TorchBackend, iter_outputs
from prodclass.io import file_sha1, write_bytes

log = logging.getLogger(__name__)


class EmbeddingCache:
    """Embeddings of one (backbone, weights, preprocessing) combination, by image content hash."""

    def __init__(self, root: str | Path, backbone_name: str, weights_id: str, preprocessing_key: str):
        key = hashlib.sha1(f"{backbone_name}|{weights_id}|{preprocessing_key}".encode()).hexdigest()[:16]
        self.dir = Path(root) / "embeddings" / f"{backbone_name}-{key}"
        self._store: dict[str, np.ndarray] | None = None

    @classmethod
    def for_backbone(cls, root: str | Path, backbone, weights_path: str | None = None) -> "EmbeddingCache":
        """The cache for a :class:`prodclass.features.backbones.Backbone` (weights identified by file name,
        or by content hash for a user weights file)."""
        weights_id = file_sha1(weights_path) if weights_path else Path(backbone.spec.weights()).name
        return cls(root, backbone.name, weights_id, backbone.preprocessing.key())

    def _load(self) -> dict[str, np.ndarray]:
        if self._store is None:
            self._store = {}
            for shard in sorted(self.dir.glob("shard-*.npz")):
                try:
                    with np.load(shard) as z:
                        self._store.update(zip(z["hashes"].tolist(), z["embeddings"], strict=True))
                except Exception as e:  # a foreign/broken file must not stop a run
                    log.warning("ignoring unreadable cache shard %s: %s", shard, e)
        return self._store

    def __len__(self) -> int:
        return len(self._load())

    def get(self, h: str) -> np.ndarray | None:
        return self._load().get(h)

    def put_many(self, hashes: Sequence[str], embeddings: np.ndarray) -> None:
        """Store ``embeddings`` float32 ``(n, D)`` for ``hashes`` as one new atomic shard."""
        if len(hashes) == 0:
            return
        buf = io.BytesIO()
        np.savez(buf, hashes=np.asarray(hashes), embeddings=np.asarray(embeddings, np.float32))
        write_bytes(self.dir / f"shard-{uuid.uuid4().hex}.npz", buf.getvalue())
        self._load().update(zip(hashes, np.asarray(embeddings, np.float32), strict=True))


def embed_images(
    paths: Sequence[str],
    backbone,
    cache: EmbeddingCache | None = None,
    batch_size: int = 32,
    flush_every: int = 1024,
    progress: bool = True,
    hashes: Sequence[str] | None = None,
) -> tuple[np.ndarray, dict]:
    """Embed image files, reusing and filling ``cache``.

    The images the cache lacks go through :func:`prodclass.inference.iter_outputs` with a
    :class:`~prodclass.inference.TorchBackend` of ``backbone`` (its own channels-last inference
    copy: ``backbone`` itself is left as it was).

    Args:
        paths: N image files.
        backbone: a :class:`prodclass.features.backbones.Backbone` (its preprocessing is used).
        cache: where embeddings are looked up and stored; ``None`` computes everything.
        batch_size: images per forward pass.
        flush_every: write a cache shard after this many new embeddings.
        hashes: precomputed content hashes of ``paths`` (computed if omitted).

    Returns:
        ``(embeddings, stats)``: float32 ``(N, embed_dim)`` in the order of ``paths``, and
        ``{"images", "cached", "computed", "seconds", "images_per_s"}`` (rate over computed).

    Raises:
        prodclass.preprocess.ImageError: a file that cannot be decoded (names the file).
    """
    hashes = list(hashes) if hashes is not None else [file_sha1(p) for p in paths]
    out = np.zeros((len(paths), backbone.embed_dim), np.float32)
    todo = []
    for i, h in enumerate(hashes):
        v = cache.get(h) if cache is not None else None
        if v is None:
            todo.append(i)
        else:
            out[i] = v
    stats = {"images": len(paths), "cached": len(paths) - len(todo), "computed": len(todo)}
    t0 = time.perf_counter()
    if todo:
        _compute(backbone, [paths[i] for i in todo], [hashes[i] for i in todo], out, np.asarray(todo), cache,
                 batch_size, flush_every, progress)
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    stats["images_per_s"] = round(len(todo) / stats["seconds"], 1) if todo and stats["seconds"] > 0 else None
    return out, stats


def _compute(backbone, paths: list[str], hashes: list[str], out: np.ndarray, rows: np.ndarray,
             cache: EmbeddingCache | None, batch_size: int, flush_every: int, progress: bool) -> None:
    """Embed ``paths`` into ``out[rows]``, writing a cache shard every ``flush_every`` images."""
    from tqdm.auto import tqdm

    backend = TorchBackend(backbone)
    pending_h, pending_v = [], []
    with tqdm(total=len(paths), desc=f"embedding ({backbone.name})", unit="img", disable=not progress) as bar:
        for batch in iter_outputs(backend, paths, backbone.preprocessing, batch_size, workers=2, strict=True):
            out[rows[batch.index]] = batch.outputs
            pending_h += [hashes[i] for i in batch.index]
            pending_v.append(batch.outputs)
            if cache is not None and len(pending_h) >= flush_every:
                cache.put_many(pending_h, np.concatenate(pending_v))
                pending_h, pending_v = [], []
            bar.update(len(batch.index))
    if cache is not None and pending_h:
        cache.put_many(pending_h, np.concatenate(pending_v))
