"""Atomic file writes and content hashing.

Every file prodclass writes (checkpoints, caches, reports, predictions) goes through
:func:`atomic_write`: the bytes go to a temporary file in the same directory, are flushed and
fsync'ed, then ``os.replace`` swaps them in. A crash or Ctrl-C leaves either the old file or
the new one, never a truncated mix (POSIX ``rename`` is atomic within one file system).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[io.IOBase]:
    """Open a temporary file next to ``path`` and atomically move it there on success.

    Args:
        path: destination file; its parent directory is created if needed.
        mode: ``"wb"`` or ``"w"`` (text, UTF-8).

    On an exception inside the ``with`` block the temporary file is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write UTF-8 ``text`` to ``path``."""
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (NumPy scalars/arrays are converted)."""
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file written by :func:`write_json`."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """Atomically ``torch.save`` ``obj`` (checkpoints survive a kill mid-write)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def save_figure(path: str | os.PathLike, fig, **kwargs) -> None:
    """Atomically save a matplotlib figure (format from the suffix) and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def write_dataframe(path: str | os.PathLike, df) -> None:
    """Atomically write a DataFrame as CSV or Parquet (by suffix)."""
    buf = io.BytesIO()
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        df.to_parquet(buf, index=False)
    elif suffix == ".csv":
        buf.write(df.to_csv(index=False).encode("utf-8"))
    else:
        raise ValueError(f"{path}: unsupported table format {suffix!r} (use .csv or .parquet)")
    write_bytes(path, buf.getvalue())


def file_sha1(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-1 hex digest of a file's bytes (the content hash keying the embedding cache)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
