"""Atomic file writes, an exclusive lock file, and content hashing.

Every file prodclass writes (checkpoints, caches, reports, predictions) goes through
:func:`atomic_write`: the bytes go to a temporary file in the same directory, are flushed and
fsync'ed, then ``os.replace`` swaps them in. A crash or Ctrl-C leaves either the old file or
the new one, never a truncated mix (POSIX ``rename`` is atomic within one file system).

File modes: a new file gets ``0o666 & ~umask`` (what ``open(path, "w")`` would give, e.g.
``0o644`` under the usual umask ``022``), a replaced file keeps the mode it had.
:func:`tempfile.mkstemp` alone would leave every file ``0o600`` whatever the umask.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator


class LockedError(RuntimeError):
    """Another process holds the lock file (:func:`exclusive_lock`); the message names it."""


def current_umask() -> int:
    """The process umask (e.g. ``0o022``), read without changing it.

    Source: the ``Umask:`` line of ``/proc/self/status`` (Linux ≥ 4.7). Elsewhere the umask is
    set and restored at once (``os.umask``), which is not thread-safe, so that fallback value is
    read once and cached.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _fallback_umask()


@functools.cache
def _fallback_umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def _new_file_mode(path: Path) -> int:
    """Permission bits for ``path`` written anew: its current mode if it exists, else ``0o666 & ~umask``."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[io.IOBase]:
    """Open a temporary file next to ``path`` and atomically move it there on success.

    Args:
        path: destination file; its parent directory is created if needed.
        mode: ``"wb"`` or ``"w"`` (text, UTF-8).

    On an exception inside the ``with`` block the temporary file is removed and ``path`` is
    left as it was. The file's permission bits: see the module docstring (umask respected).

    Raises:
        OSError: the folder cannot be created or written, or ``path`` is a folder
            (``IsADirectoryError`` from ``os.replace``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _new_file_mode(path))
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on the lock file ``path`` for the ``with`` block (without waiting).

    The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``path`` (created, mode per the umask;
    advisory: it excludes only other holders of the same lock). The file is removed on release;
    a holder checks after locking that ``path`` is still the file it locked, so a file removed
    by the previous holder in between is never shared by two processes. The lock dies with its
    process (a killed job leaves at most an unlocked file, which the next job takes over).

    Raises:
        LockedError: another process holds the lock (the message names ``path``).
        OSError: the lock file cannot be created (e.g. its folder is not writable).
    """
    import fcntl

    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(f"{path}: locked by another running process") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


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
