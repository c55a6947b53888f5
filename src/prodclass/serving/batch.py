"""Resumable batch prediction: a folder, glob or catalog of images → one predictions file.

:func:`expand_inputs` turns what the user typed into an ordered list of entries; every file,
link and catalog row named becomes exactly one output row (a missing, empty, truncated or
non-image file, a broken or looping symbolic link, a FIFO, a malformed catalog row or an empty
argument gets a row with its ``error``, naming the file and, for a catalog row, the line and
column; the job never stops for one image). Entries known to be unreadable before any decoding
are :class:`BadInput` strings carrying their reason. :func:`predict_to_file` writes the table::

    image, label_1, prob_1, ..., label_k, prob_k, abstain, error

How resume works: the input list is cut into fixed chunks of ``chunk_size`` positions. Each
finished chunk is written atomically to ``<out>.parts/chunk-<i>.parquet`` beside a
``manifest.json`` fingerprinting the job (input list, model, top-k, chunk size). One job at a
time writes ``out``: it holds an exclusive lock on ``<out>.lock`` (:func:`prodclass.io.exclusive_lock`)
while it runs, and a second job on the same file stops at once with an error naming the lock. A killed or
interrupted job leaves only whole chunks; run the same command again and it skips the chunks
on disk, so no row is computed or written twice (the backend may change in between: torch and
ONNX agree to 1e-4). When all chunks exist they are merged in input
order into ``out`` (CSV, JSON lines or Parquet, written atomically) and the parts folder is
removed. A parts folder whose manifest belongs to another job is discarded.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Iterator, Sequence

import pandas as pd

from prodclass.catalog import CatalogError
from prodclass.catalog.csvfile import path_problem, read_csv_records
from prodclass.io import LockedError, exclusive_lock, read_json, write_dataframe, write_json, write_text
from prodclass.serving.predictor import Prediction

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image_path", "image", "image_name", "path", "file", "filename", "file_name")
CATALOG_SUFFIXES = (".csv", ".tsv", ".parquet")
OUT_SUFFIXES = (".csv", ".jsonl", ".parquet")


class BadInput(str):
    """An input that becomes an error row without being decoded: a broken or looping symbolic
    link, a FIFO or device, an empty argument, a malformed catalog row, an empty folder.

    The string is what the row's ``image`` column shows (the path, or ``<catalog>:<line>`` for a
    catalog row); :attr:`reason` is its ``error`` (it names the file, and line and column for a
    catalog row).
    """

    reason: str

    def __new__(cls, shown: str, reason: str) -> "BadInput":
        self = super().__new__(cls, shown)
        self.reason = reason
        return self


def expand_inputs(inputs: Sequence[str], image_column: str | None = None, image_dir: str | Path | None = None) -> list[str]:
    """What the user typed → one entry per output row, in a stable order.

    Every file, link and catalog row named gives exactly one entry: an image path (``str``), or
    a :class:`BadInput` (a ``str`` too) when it is known here already that it cannot be read.

    - a folder: every non-hidden entry under it, recursively, in sorted order (names starting
      with ``.`` are skipped). Symbolic links to folders are followed; a link that leads back
      to a folder it is in (a loop) is one error row, not followed. A broken link, a link loop,
      a FIFO, socket or device, and a subfolder that cannot be listed are error rows. A folder
      holding no file at all is one error row.
    - a catalog table (``.csv``/``.tsv``/``.parquet``): one entry per data row, the path from
      ``image_column`` (default: the first of :data:`IMAGE_COLUMNS` present; relative paths are
      taken under ``image_dir``, default the table's folder). Parsing is strict: a ragged row,
      a cell that is not UTF-8, a malformed record or an empty path cell is an error row naming
      the catalog, its line (as a text editor numbers them; Parquet: 0-based row) and column.
      A catalog without data rows is one error row.
    - a glob pattern (when no file has that name): the sorted matches; folders it matches are
      not entered (a pattern selects files), links and special files are checked as above.
    - anything else: the path as given (a missing file becomes an error row when decoded);
      an empty argument is an error row (it names no file; it never means the current folder).

    Raises:
        prodclass.catalog.CatalogError: a catalog that cannot be parsed at all (unreadable,
            empty, no header, a header that is not UTF-8, no image column).
        ValueError: a glob that matches nothing.
    """
    out: list[str] = []
    for item in map(str, inputs):
        p = Path(item)
        if not item.strip():
            out.append(BadInput(item, f"{item!r}: empty argument (it names no file or folder)"))
        elif p.is_dir():
            out += _walk(p)
        elif p.is_file() and p.suffix.lower() in CATALOG_SUFFIXES:
            out += _catalog_paths(p, image_column, image_dir)
        elif not os.path.lexists(item) and glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise ValueError(f"{item}: pattern matches no file")
            out += [m if kind == "file" else _bad(m, kind) for m in matches
                    if (kind := _kind(Path(m))) != "dir"]
        else:
            kind = _kind(p)
            out.append(item if kind in ("file", "missing") else _bad(item, kind))
    return out


def _kind(p: Path) -> str:
    """``file``, ``dir``, ``missing`` (no such path, not a link), or why the entry cannot be read
    (a broken link, a link loop, a FIFO/socket/device, a name holding a NUL character)."""
    try:
        mode = p.stat().st_mode
    except ValueError:  # os.stat refuses a name with a NUL character
        return "not a valid path (it holds a NUL character)"
    except OSError as e:
        if not p.is_symlink():
            return "missing" if e.errno in (errno.ENOENT, errno.ENOTDIR) else f"cannot read it ({e.strerror})"
        if e.errno == errno.ELOOP:
            return "symbolic link loop (the link leads back to itself)"
        try:
            target = os.readlink(p)
        except OSError:
            target = "?"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"broken symbolic link (its target {target} does not exist)"
        return f"cannot follow symbolic link to {target} ({e.strerror})"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
    return f"not a regular file (a {kind})"


def _bad(path: str | Path, why: str) -> BadInput:
    return BadInput(str(path), f"{path}: {why}")


def _walk(root: Path) -> list[str]:
    """Entries under the folder ``root`` (see :func:`expand_inputs`), depth first, in sorted order
    (the order of ``sorted(root.rglob("*"))``).

    Each open folder carries the (device, inode) pairs of itself and its ancestors, so a symbolic
    link back into one of them is caught without resolving paths; a link to a folder elsewhere
    is followed (and walked once per link that leads to it).
    """
    out: list[str] = []
    st = root.stat()
    top = _listing(root)
    if isinstance(top, str):
        return [_bad(root, top)]
    stack = [(iter(top), frozenset({(st.st_dev, st.st_ino)}))]
    while stack:
        entries, chain = stack[-1]
        p = next(entries, None)
        if p is None:
            stack.pop()
            continue
        kind = _kind(p)
        if kind != "dir":
            out.append(str(p) if kind == "file" else _bad(p, kind))
            continue
        sub = p.stat()
        if (sub.st_dev, sub.st_ino) in chain:
            out.append(_bad(p, f"symbolic link loop (leads back to {os.path.realpath(p)}, a folder it is in; "
                               "not followed)"))
            continue
        listing = _listing(p)
        if isinstance(listing, str):
            out.append(_bad(p, listing))
        else:
            stack.append((iter(listing), chain | {(sub.st_dev, sub.st_ino)}))
    return out or [_bad(root, "folder holds no file (hidden files, named .*, are skipped)")]


def _listing(folder: Path) -> list[Path] | str:
    """The non-hidden entries of ``folder``, sorted by name, or why it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            return [folder / n for n in sorted(e.name for e in it if not e.name.startswith("."))]
    except OSError as e:
        return f"cannot list folder ({e.strerror})"


def _catalog_paths(path: Path, column: str | None, image_dir: str | Path | None) -> list[str]:
    """One entry per data row of a catalog table (see :func:`expand_inputs`).

    Raises:
        CatalogError: the table cannot be parsed at all, or has no image column.
    """
    columns, rows = _catalog_rows(path)
    col = column or next((c for c in IMAGE_COLUMNS if c in columns), None)
    if col not in columns:
        wanted = repr(column) if column else f"any of {list(IMAGE_COLUMNS)}"
        raise CatalogError(f"{path}: no image column {wanted}; columns are {list(columns)} (use --image-column)")
    if not rows:
        return [_bad(path, "catalog has no data rows")]
    base, i = Path(image_dir) if image_dir else path.parent, columns.index(col)
    out: list[str] = []
    for where, cells, error in rows:
        value = "" if error else cells[i].strip()
        problem = error or (path_problem(value) and f"{where}, column {col!r}: {path_problem(value)}")
        if problem:
            out.append(BadInput(f"{path} {where}", f"{path}: {problem}"))
        else:
            out.append(value if Path(value).is_absolute() else str(base / value))
    return out


def _catalog_rows(path: Path) -> tuple[list[str], list[tuple[str, tuple[str, ...], str | None]]]:
    """``(columns, rows)`` of a catalog; each row ``(where, cells, error)``: ``where`` is its
    ``line N`` (CSV/TSV, 1-based as an editor shows it) or ``row N`` (Parquet, 0-based), cells are
    strings (a missing Parquet value: ``""``), ``error`` names the line (and column) or is None.

    Raises:
        CatalogError: unreadable, empty or headerless file (see
            :func:`prodclass.catalog.csvfile.read_csv_records`), or a Parquet file pyarrow rejects.
    """
    if path.suffix.lower() != ".parquet":
        columns, records = read_csv_records(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")
        return columns, [(f"line {r.line}", r.cells, r.error) for r in records]
    try:
        t = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises many types for a damaged file
        raise CatalogError(f"{path}: cannot read Parquet table ({type(e).__name__}: {e})") from None
    cells = t.astype(object).where(t.notna(), "").astype(str) if len(t) else t
    return [str(c) for c in t.columns], [(f"row {i}", tuple(v), None) for i, v in enumerate(cells.itertuples(index=False))]


def iter_predictions(predictor, images: Sequence[str], top_k: int = 5, batch_size: int = 32) -> Iterator:
    """One :class:`~prodclass.serving.predictor.Prediction` per entry of ``images``, in order: a
    :class:`BadInput` gets an error prediction with its reason (it is never opened), every other
    path goes through ``predictor.iter_predict`` (decoded ahead, in batches of ``batch_size``)."""
    stream = predictor.iter_predict([i for i in images if not isinstance(i, BadInput)], top_k=top_k,
                                    batch_size=batch_size)
    try:
        for item in images:
            yield Prediction(error=item.reason) if isinstance(item, BadInput) else next(stream)
    finally:
        stream.close()


def shown_path(path: str) -> str:
    """``path`` as output files and the terminal show it: a file name's bytes that are not UTF-8
    (kept by Python as lone surrogates) become ``\\xNN`` escapes, so the text can be written."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def prediction_rows(images: Sequence[str], predictions: Sequence, top_k: int) -> pd.DataFrame:
    """Rows for :class:`prodclass.serving.predictor.Prediction` s: ``image, label_1, prob_1, ..., abstain, error``
    (labels/probs empty for error rows)."""
    rows = []
    for img, p in zip(images, predictions, strict=True):
        row = {"image": shown_path(img)}
        for j in range(top_k):
            row[f"label_{j + 1}"] = p.labels[j] if j < len(p.labels) else None
            row[f"prob_{j + 1}"] = round(p.probs[j], 6) if j < len(p.probs) else None
        rows.append({**row, "abstain": bool(p.abstain), "error": None if p.error is None else shown_path(p.error)})
    return pd.DataFrame(rows, columns=["image", *[f"{k}_{j + 1}" for j in range(top_k) for k in ("label", "prob")],
                                       "abstain", "error"])


def write_table(path: str | Path, table: pd.DataFrame) -> None:
    """Atomically write a predictions table as ``.csv``, ``.jsonl`` or ``.parquet`` (by suffix)."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        write_text(path, table.to_json(orient="records", lines=True, force_ascii=False))
    else:
        write_dataframe(path, table)


def predict_to_file(predictor, images: Sequence[str], out: str | Path, review_out: str | Path | None = None,
                    top_k: int = 5, batch_size: int = 32, chunk_size: int = 512, progress: bool = True,
                    echo=print) -> dict:
    """Predict every image and write one row each to ``out``, resuming an interrupted job.

    Args:
        predictor: a :class:`prodclass.serving.predictor.Predictor`.
        images: N image paths (see :func:`expand_inputs`); row i of ``out`` is ``images[i]``.
        out: ``.csv``, ``.jsonl`` or ``.parquet`` file.
        review_out: also write the rows that abstain or failed here (same columns + ``reason``),
            for a human to look at.
        top_k: labels per row.
        batch_size: images per network call.
        chunk_size: images per resumable chunk (the most work a kill can lose).
        progress: show a progress bar.
        echo: where one-line status messages go.

    Returns:
        ``{"n", "predicted", "errors", "abstained", "resumed", "seconds", "images_per_s", "out",
        "review"}`` (``resumed``: rows taken from an earlier, interrupted run; the rate counts
        only the images predicted now).

    Raises:
        ValueError: an output file that cannot be written (see :func:`check_output`), before any work.
        prodclass.io.LockedError: another job is writing ``out`` now (it holds ``<out>.lock``).
        OSError: an output folder that cannot be written (names it).
        KeyboardInterrupt: passed on after the finished chunks are safely on disk.
    """
    out = Path(out)
    check_output(out, review_out)
    images = [i if isinstance(i, BadInput) else str(i) for i in images]
    lock = out.with_name(out.name + ".lock")
    out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(lock))
        except LockedError:
            raise LockedError(f"{out}: another job is writing this file now (it holds the lock {lock}); "
                              "wait for it to finish, or write to another file") from None
        return _predict_locked(predictor, images, out, review_out, top_k, batch_size, chunk_size, progress, echo)


def check_output(out: str | Path, review_out: str | Path | None = None) -> None:
    """Fail early, before any image is read, on output paths that cannot be written.

    Raises:
        ValueError: an unsupported suffix (not one of :data:`OUT_SUFFIXES`), a path that is an
            existing folder, a path under a file (a parent that is not a folder), or
            ``review_out`` naming the same file as ``out`` (each message names the path).
    """
    for p in map(Path, filter(None, (out, review_out))):
        if p.suffix.lower() not in OUT_SUFFIXES:
            raise ValueError(f"{p}: unsupported output format (use {', '.join(OUT_SUFFIXES)})")
        if p.is_dir():
            raise ValueError(f"{p}: is a folder; give a file name, e.g. {p / ('predictions' + p.suffix.lower())}")
        parent = next(a for a in p.parents if os.path.lexists(a))
        if not parent.is_dir():
            raise ValueError(f"{p}: cannot be created: {parent} is not a folder")
    if review_out and Path(review_out).resolve() == Path(out).resolve():
        raise ValueError(f"{review_out}: the review file is the output file itself; give another name")


def _predict_locked(predictor, images: list[str], out: Path, review_out, top_k: int, batch_size: int,
                    chunk_size: int, progress: bool, echo) -> dict:
    """:func:`predict_to_file`'s work, while it holds the output's lock."""
    top_k = min(top_k, len(predictor.classes))
    chunks = [range(s, min(s + chunk_size, len(images))) for s in range(0, len(images), chunk_size)]
    parts = _open_parts(out, _manifest(predictor, images, chunk_size, top_k), echo)
    todo = [i for i in range(len(chunks)) if not _chunk_file(parts, i).is_file()]
    resumed = len(images) - sum(len(chunks[i]) for i in todo)
    if resumed:
        echo(f"resuming: {resumed} of {len(images)} images already done in {parts}")
    t0 = time.perf_counter()
    _run_chunks(predictor, images, chunks, todo, parts, top_k, batch_size, progress, echo)
    seconds = time.perf_counter() - t0
    table = _merge_chunks(parts, len(chunks), images, top_k)
    write_table(out, table)
    review = None
    if review_out:
        review = table[table["abstain"].astype(bool) | table["error"].notna()].assign(
            reason=lambda t: t["error"].notna().map({True: "error", False: "low confidence"}))
        write_table(review_out, review)
    shutil.rmtree(parts)
    n_new = sum(len(chunks[i]) for i in todo)
    return {"n": len(images), "predicted": int(table["error"].isna().sum()), "errors": int(table["error"].notna().sum()),
            "abstained": int(table["abstain"].astype(bool).sum()), "resumed": resumed, "seconds": round(seconds, 2),
            "images_per_s": round(n_new / seconds, 1) if n_new and seconds > 0 else None,
            "out": str(out), "review": None if review is None else {"file": str(review_out), "rows": len(review)}}


def _manifest(predictor, images: list[str], chunk_size: int, top_k: int) -> dict:
    """What identifies a job: its inputs, chunking and model (a parts folder of another job is discarded)."""
    return {
        "inputs_sha1": hashlib.sha1("\n".join(images).encode("utf-8", "surrogateescape")).hexdigest(),
        "bad_inputs_sha1": hashlib.sha1("\n".join(f"{i}\t{i.reason}" for i in images if isinstance(i, BadInput))
                                        .encode("utf-8", "surrogateescape")).hexdigest(), "n": len(images),
        "chunk_size": chunk_size, "top_k": top_k, "model": predictor.meta.get("run_dir") or predictor.meta.get("onnx"),
        "classes_sha1": hashlib.sha1(json.dumps(predictor.classes).encode()).hexdigest(),
        "temperature": predictor.temperature, "threshold": predictor.threshold,
    }


def _open_parts(out: Path, manifest: dict, echo) -> Path:
    """The ``<out>.parts`` folder of this job, emptied first when another job left it."""
    parts = out.with_name(out.name + ".parts")
    if parts.is_dir() and _read_manifest(parts) != manifest:
        echo(f"{parts}: left by a different job (inputs or model differ); starting over")
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    write_json(parts / "manifest.json", manifest)
    return parts


def _run_chunks(predictor, images: list[str], chunks: list[range], todo: list[int], parts: Path, top_k: int,
                batch_size: int, progress: bool, echo) -> None:
    """Predict the chunks in ``todo`` and write each one atomically as soon as it is complete."""
    from tqdm.auto import tqdm

    resumed = len(images) - sum(len(chunks[i]) for i in todo)
    work = [j for i in todo for j in chunks[i]]
    stream = iter_predictions(predictor, [images[j] for j in work], top_k=top_k, batch_size=batch_size)
    with tqdm(total=len(images), initial=resumed, unit="img", desc="predict", disable=not progress) as bar:
        try:
            for i in todo:
                preds = [next(stream) for _ in chunks[i]]
                write_dataframe(_chunk_file(parts, i), prediction_rows([images[j] for j in chunks[i]], preds, top_k))
                bar.update(len(preds))
        except KeyboardInterrupt:
            done = sum(len(c) for i, c in enumerate(chunks) if _chunk_file(parts, i).is_file())
            echo(f"interrupted: {done} of {len(images)} images saved in {parts}; run the same command to resume")
            raise
        finally:
            stream.close()


def _merge_chunks(parts: Path, n_chunks: int, images: list[str], top_k: int) -> pd.DataFrame:
    """All chunks in input order; ``RuntimeError`` when they do not cover the inputs exactly."""
    cols = prediction_rows([], [], top_k).columns
    table = pd.concat([pd.read_parquet(_chunk_file(parts, i)) for i in range(n_chunks)] or [pd.DataFrame(columns=cols)],
                      ignore_index=True)
    if len(table) != len(images) or table["image"].tolist() != [shown_path(i) for i in images]:
        raise RuntimeError(f"{parts}: chunks do not cover the inputs ({len(table)} rows for {len(images)} images)")
    return table


def _chunk_file(parts: Path, i: int) -> Path:
    return parts / f"chunk-{i:06d}.parquet"


def _read_manifest(parts: Path) -> dict | None:
    try:
        return read_json(parts / "manifest.json")
    except (OSError, ValueError):
        return None
