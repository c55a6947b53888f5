"""A CSV or Parquet table beside an image folder (e.g. ``abo-small``, ``fashion-product-images``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import CatalogError, validate_catalog
from .csvfile import path_problem, read_csv_records


def read_table(
    path: str | Path,
    image_dir: str | Path,
    columns: dict[str, str] | None = None,
    image_suffix: str | None = None,
    check_files: bool = True,
) -> pd.DataFrame:
    """Read a table with one row per image into the Catalog shape.

    Args:
        path: ``.csv`` (``.tsv``: tab-separated; either may be ``.gz``-compressed) or ``.parquet``
            file; CSV is UTF-8, read strictly (see :func:`_read_raw`).
        image_dir: folder the image column's values are relative to.
        columns: Catalog column ← table column, e.g. ``{"image_path": "image_name",
            "item_name": "name"}``. Unmapped table columns keep their names. If ``image_id`` or
            ``item_id`` are absent they default to the image file's stem (one image per item).
        image_suffix: appended to image column values that have none (``styles.csv`` stores
            ``15970`` for ``images/15970.jpg``); by default ``.jpg`` is added only when the
            value has no suffix.
        check_files: fail on the first row whose image file does not exist.

    Raises:
        CatalogError: unreadable table; a ragged CSV row or a cell that is not UTF-8 (names
            the line and column); a mapped column that the table lacks (names it and lists the
            columns there are); an empty image cell (names the line and column); a missing image
            file (names the row and its CSV line).
    """
    path = Path(path)
    image_dir = Path(image_dir)
    raw, lines = _read_raw(path)
    columns = dict(columns or {})
    columns.setdefault("image_path", columns.pop("image", "image_path"))
    unknown = {dst: src for dst, src in columns.items() if src not in raw.columns}
    if unknown:
        dst, src = next(iter(unknown.items()))
        raise CatalogError(f"{path}: column {src!r} (mapped to {dst!r}) not in table; columns are {list(raw.columns)}")
    df = raw.rename(columns={src: dst for dst, src in columns.items() if src != dst})
    df = df.loc[:, ~df.columns.duplicated()]
    _check_image_cells(df["image_path"], path, columns["image_path"], lines)
    names = df["image_path"].astype(str)
    if image_suffix is not None:
        names = names.where(names.str.contains(r"\.[A-Za-z0-9]+$"), names + image_suffix)
    else:
        names = names.where(names.str.contains(r"\.[A-Za-z0-9]+$"), names + ".jpg")
    df["image_path"] = [str((image_dir / n).resolve()) if not Path(n).is_absolute() else n for n in names]
    stems = df["image_path"].map(lambda p: Path(p).stem)
    if "image_id" not in df.columns:
        df["image_id"] = stems
    if "item_id" not in df.columns:
        df["item_id"] = df["image_id"]
    if "is_main_image" not in df.columns:
        df["is_main_image"] = True
    elif df["is_main_image"].dtype == object:
        df["is_main_image"] = df["is_main_image"].astype(str).str.lower().isin(["1", "true", "yes"])
    # validate_catalog's row numbers are 0-based data rows; ``lines`` adds each CSV row's line.
    return validate_catalog(df, source=str(path), check_files=check_files, lines=lines)


def _read_raw(path: Path) -> tuple[pd.DataFrame, list[int] | None]:
    """The table as read (CSV/TSV cells as strings, empty cells NaN) and, for CSV/TSV, each row's line.

    CSV and TSV (``.tsv``; ``.gz`` compressed or not) are read strictly
    (:func:`prodclass.catalog.csvfile.read_csv_records`): a ragged row or a cell that is not
    UTF-8 is an error naming the file, line and column, never a shifted or dropped value.

    Raises:
        CatalogError: the table cannot be read, or a CSV row is malformed (the first one is
            named, with the count of all).
    """
    if path.suffix.lower() == ".parquet":
        try:
            return pd.read_parquet(path), None
        except FileNotFoundError:
            raise CatalogError(f"{path}: catalog table does not exist") from None
        except Exception as e:  # pyarrow raises many types for malformed files
            raise CatalogError(f"{path}: cannot read table: {e}") from e
    sep = "\t" if path.name.lower().endswith((".tsv", ".tsv.gz")) else ","
    columns, records = read_csv_records(path, sep=sep)
    bad = [r for r in records if r.error]
    if bad:
        raise CatalogError(f"{path}: {bad[0].error}" + (f" ({len(bad)} malformed rows in all)" if len(bad) > 1 else ""))
    raw = pd.DataFrame([r.cells for r in records], columns=columns, dtype=object)
    return raw.mask(raw == ""), [r.line for r in records]


def _check_image_cells(values: pd.Series, path: Path, column: str, lines: list[int] | None) -> None:
    """Raise :class:`CatalogError` naming the first row whose image cell is empty or holds a NUL character.

    Rows are named by CSV line, or for Parquet by 0-based row (as pandas and
    :func:`prodclass.catalog.validate_catalog` count them).
    """
    problems = [_cell_problem(v) for v in values.tolist()]
    rows = [i for i, p in enumerate(problems) if p]
    if rows:
        i = rows[0]
        where = f"line {lines[i]}" if lines is not None else f"row {i}"
        raise CatalogError(f"{path}: {where}, column {column!r}: {problems[i]}"
                           + (f" ({len(rows)} such rows in all)" if len(rows) > 1 else ""))


def _cell_problem(value) -> str | None:
    """Why one image cell cannot be a path (missing, empty, a NUL character), or None."""
    if isinstance(value, str):
        return path_problem(value)
    return "empty image path" if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)) else None
