"""Resumable batch prediction: a folder, glob or catalog of images → one predictions file.

:func:`expand_inputs` turns what the user typed into an ordered list of image paths; every one
becomes exactly one output row (a missing, empty, truncated or non-image file gets a row with
its ``error``; the job never stops for one image). :func:`predict_to_file` writes the table::

    image, label_1, prob_1, ..., label_k, prob_k, abstain, error

How resume works: the input list is cut into fixed chunks of ``chunk_size`` positions. Each
finished chunk is written atomically to ``<out>.parts/chunk-<i>.parquet`` beside a
``manifest.json`` fingerprinting the job (input list, model, top-k, chunk size). A killed or
interrupted job leaves only whole chunks; run the same command again and it skips the chunks
on disk, so no row is computed or written twice (the backend may change in between: torch and
ONNX agree to 1e-4). When all chunks exist they are merged in input
order into ``out`` (CSV, JSON lines or Parquet, written atomically) and the parts folder is
removed. A parts folder whose manifest belongs to another job is discarded.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from prodclass.io import read_json, write_dataframe, write_json, write_text

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image_path", "image", "image_name", "path", "file", "filename", "file_name")
CATALOG_SUFFIXES = (".csv", ".tsv", ".parquet")
OUT_SUFFIXES = (".csv", ".jsonl", ".parquet")


def expand_inputs(inputs: Sequence[str], image_column: str | None = None, image_dir: str | Path | None = None) -> list[str]:
    """What the user typed → image paths, in a stable order.

    Each input is a folder (every non-hidden file under it, recursively, sorted), a catalog
    table (``.csv``/``.tsv``/``.parquet``: one path per row from ``image_column``, default the
    first of :data:`IMAGE_COLUMNS` present; relative paths are taken under ``image_dir``,
    default the table's folder), a glob pattern (sorted matches), or a file path (kept as is,
    even when it does not exist: it becomes an error row).

    Raises:
        ValueError: a catalog without the image column, or a glob that matches nothing.
    """
    out: list[str] = []
    for item in map(str, inputs):
        p = Path(item)
        if p.is_dir():
            out += [str(f) for f in sorted(p.rglob("*"))
                    if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)]
        elif p.is_file() and p.suffix.lower() in CATALOG_SUFFIXES:
            out += _catalog_paths(p, image_column, image_dir)
        elif not p.exists() and glob.has_magic(item):
            matches = sorted(f for f in glob.glob(item, recursive=True) if Path(f).is_file())
            if not matches:
                raise ValueError(f"{item}: pattern matches no file")
            out += matches
        else:
            out.append(item)
    return out


def _catalog_paths(path: Path, column: str | None, image_dir: str | Path | None) -> list[str]:
    t = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(
        path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str, keep_default_na=False)
    col = column or next((c for c in IMAGE_COLUMNS if c in t.columns), None)
    if col not in t.columns:
        wanted = repr(column) if column else f"any of {list(IMAGE_COLUMNS)}"
        raise ValueError(f"{path}: no image column {wanted}; columns are {list(t.columns)} (use --image-column)")
    base = Path(image_dir) if image_dir else path.parent
    return [str(base / v) if v and not Path(v).is_absolute() else str(v)
            for v in t[col].fillna("").astype(str).str.strip()]


def prediction_rows(images: Sequence[str], predictions: Sequence, top_k: int) -> pd.DataFrame:
    """Rows for :class:`prodclass.serving.predictor.Prediction` s: ``image, label_1, prob_1, ..., abstain, error``
    (labels/probs empty for error rows)."""
    rows = []
    for img, p in zip(images, predictions, strict=True):
        row = {"image": str(img)}
        for j in range(top_k):
            row[f"label_{j + 1}"] = p.labels[j] if j < len(p.labels) else None
            row[f"prob_{j + 1}"] = round(p.probs[j], 6) if j < len(p.probs) else None
        rows.append({**row, "abstain": bool(p.abstain), "error": p.error})
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
        ValueError: an unsupported output suffix.
        KeyboardInterrupt: passed on after the finished chunks are safely on disk.
    """
    out = Path(out)
    for p in filter(None, (out, review_out)):
        if Path(p).suffix.lower() not in OUT_SUFFIXES:
            raise ValueError(f"{p}: unsupported output format (use {', '.join(OUT_SUFFIXES)})")
    images = [str(i) for i in images]
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
        "inputs_sha1": hashlib.sha1("\n".join(images).encode()).hexdigest(), "n": len(images),
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
    stream = predictor.iter_predict([images[j] for j in work], top_k=top_k, batch_size=batch_size)
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
    if len(table) != len(images) or table["image"].tolist() != images:
        raise RuntimeError(f"{parts}: chunks do not cover the inputs ({len(table)} rows for {len(images)} images)")
    return table


def _chunk_file(parts: Path, i: int) -> Path:
    return parts / f"chunk-{i:06d}.parquet"


def _read_manifest(parts: Path) -> dict | None:
    try:
        return read_json(parts / "manifest.json")
    except (OSError, ValueError):
        return None
