"""Fashion-MNIST in its original IDX files → the Catalog table (images rendered once to PNG).

Format (http://yann.lecun.com/exdb/mnist/, "FILE FORMATS"; Fashion-MNIST uses the same): a
big-endian header ``magic:int32`` then one ``int32`` size per dimension, then ``uint8`` data.
Images: magic 2051 (``0x00000803``), dims ``(n, 28, 28)``; labels: magic 2049, dims ``(n,)``.
Files: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each optionally ``.gz`` (Debian's ``dataset-fashion-mnist`` puts
the gzip'd ones in ``/usr/share/datasets/fashion-mnist``). Class names from
https://github.com/zalandoresearch/fashion-mnist#labels.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from prodclass.config import resolve_cache_dir
from prodclass.io import file_sha1

from . import CatalogError, validate_catalog

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {"train": "train", "test": "t10k"}  # source_split → IDX file prefix
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
CHUNK = 1000  # PNGs per cache subfolder; each subfolder is rendered and renamed in atomically


def read_fashion_mnist(
    idx_dir: str | Path = DEFAULT_DIR,
    split: Literal["all", "train", "test"] = "all",
    cache_dir: str | Path | None = None,
    limit: int | None = None,
    check_files: bool = True,
) -> pd.DataFrame:
    """Read Fashion-MNIST into a Catalog, writing each image once as a 28×28 greyscale PNG.

    PNGs go under ``<cache_dir>/<sha1 of the images IDX file>/<split>-<k>/<split>-<nnnnn>.png``,
    ``cache_dir`` defaulting to ``resolve_cache_dir(None) / "fashion-mnist"``. Each subfolder of
    :data:`CHUNK` images is rendered into a temporary folder and renamed into place, so an
    interrupted run leaves only complete subfolders, and a later call renders only what is missing
    (a cached call reads just the labels: well under a second for all 70,000 rows).

    Columns: ``item_id`` = ``image_id`` (``train-00000``, ``test-09999``), ``image_path``,
    ``is_main_image`` (True), ``product_type`` (one of :data:`CLASSES`), ``class_index`` (0–9),
    ``source_split`` (``train``/``test``). Rows: train then test, in file order.

    Args:
        idx_dir: folder holding the IDX files (``.gz`` or not).
        split: ``"train"`` (60,000 images), ``"test"`` (10,000) or ``"all"``.
        cache_dir: where the PNGs go (see above).
        limit: keep only the first ``limit`` images of each split (quick looks, tests).
        check_files: check every PNG exists after rendering.

    Raises:
        CatalogError: unknown split; a missing IDX file; an unreadable one, a wrong magic number,
            wrong dimensions, a size that does not match the header, a label outside 0–9, or
            image/label counts that differ (each names the file).
    """
    if split not in ("all", "train", "test"):
        raise CatalogError(f"{idx_dir}: unknown Fashion-MNIST split {split!r} (use all, train or test)")
    idx_dir = Path(idx_dir).expanduser()
    cache = Path(cache_dir).expanduser() if cache_dir else resolve_cache_dir(None) / "fashion-mnist"
    frames = []
    for name in ("train", "test") if split == "all" else (split,):
        images_path = _find(idx_dir, f"{FILES[name]}-images-idx3-ubyte")
        labels_path = _find(idx_dir, f"{FILES[name]}-labels-idx1-ubyte")
        labels = _read_idx(labels_path, LABELS_MAGIC, 1)
        if labels.size and labels.max() >= len(CLASSES):
            raise CatalogError(f"{labels_path}: label {int(labels.max())} outside 0–9")
        n_images = _read_header(images_path, IMAGES_MAGIC, 3)[0]
        if n_images != len(labels):
            raise CatalogError(f"{images_path}: {n_images} images but the labels file has {len(labels)}")
        n = len(labels) if limit is None else min(limit, len(labels))
        out = (cache / file_sha1(images_path)[:16]).resolve()
        _render(images_path, out, name, n)
        ids = [f"{name}-{i:05d}" for i in range(n)]
        frames.append(pd.DataFrame({
            "item_id": ids, "image_id": ids,
            "image_path": [f"{out}{os.sep}{name}-{i // CHUNK:03d}{os.sep}{ids[i]}.png" for i in range(n)],
            "is_main_image": True,
            "product_type": np.asarray(CLASSES, dtype=object)[labels[:n]],
            "class_index": labels[:n].astype(np.int64),
            "source_split": name,
        }))
    return validate_catalog(pd.concat(frames, ignore_index=True), source=str(idx_dir), check_files=check_files)


def _find(idx_dir: Path, stem: str) -> Path:
    for cand in (idx_dir / f"{stem}.gz", idx_dir / stem):
        if cand.is_file():
            return cand
    raise CatalogError(f"{idx_dir / stem}(.gz): Fashion-MNIST IDX file does not exist")


def _open(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _read_header(path: Path, magic: int, ndim: int) -> tuple[int, ...]:
    """The dims of an IDX file, after checking its magic number and dimensionality."""
    try:
        with _open(path) as f:
            head = f.read(4 + 4 * ndim)
    except (OSError, EOFError, zlib.error) as e:
        raise CatalogError(f"{path}: cannot read IDX file: {e}") from e
    if len(head) < 4 + 4 * ndim:
        raise CatalogError(f"{path}: truncated IDX header ({len(head)} bytes)")
    got, *dims = np.frombuffer(head, dtype=">i4").tolist()
    if got != magic:
        raise CatalogError(f"{path}: bad IDX magic number {got} (expected {magic})")
    if ndim == 3 and dims[1:] != [28, 28]:
        raise CatalogError(f"{path}: images are {dims[1]}×{dims[2]}, expected 28×28")
    return tuple(dims)


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """A whole IDX file as a uint8 array of its header's shape."""
    dims = _read_header(path, magic, ndim)
    try:
        with _open(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise CatalogError(f"{path}: cannot read IDX file: {e}") from e
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(data) != expected:
        raise CatalogError(f"{path}: {len(data)} bytes, header {dims} implies {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _render(images_path: Path, out: Path, name: str, n: int) -> None:
    """Make sure the PNGs of images ``0..n-1`` exist under ``out``, rendering missing chunks."""
    from PIL import Image

    todo = [k for k in range(-(-n // CHUNK)) if not (out / f"{name}-{k:03d}").is_dir()]
    if not todo:
        return
    images = _read_idx(images_path, IMAGES_MAGIC, 3)
    out.mkdir(parents=True, exist_ok=True)
    for k in todo:
        final = out / f"{name}-{k:03d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=out))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is not
            for i in range(k * CHUNK, min((k + 1) * CHUNK, len(images))):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="PNG")
                (tmp / f"{name}-{i:05d}.png").write_bytes(buf.getvalue())
            try:
                os.replace(tmp, final)
            except OSError:  # another process renamed its copy in first
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
