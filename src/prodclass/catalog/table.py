"""A CSV or Parquet table beside an image folder (e.g. ``abo-small``, ``fashion-product-images``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import CatalogError, validate_catalog


def read_table(
    path: str | Path,
    image_dir: str | Path,
    columns: dict[str, str] | None = None,
    image_suffix: str | None = None,
    check_files: bool = True,
) -> pd.DataFrame:
    """Read a table with one row per image into the Catalog shape.

    Args:
        path: ``.csv`` or ``.parquet`` file.
        image_dir: folder the image column's values are relative to.
        columns: Catalog column ← table column, e.g. ``{"image_path": "image_name",
            "item_name": "name"}``. Unmapped table columns keep their names. If ``image_id`` or
            ``item_id`` are absent they default to the image file's stem (one image per item).
        image_suffix: appended to image column values that have none (``styles.csv`` stores
            ``15970`` for ``images/15970.jpg``); by default ``.jpg`` is added only when the
            value has no suffix.
        check_files: fail on the first row whose image file does not exist.

    Raises:
        CatalogError: unreadable table, a mapped column that the table lacks (names it and
            lists the columns there are), or a missing image file (names the row).
    """
    path = Path(path)
    image_dir = Path(image_dir)
    try:
        if path.suffix.lower() == ".parquet":
            raw = pd.read_parquet(path)
        else:
            raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], on_bad_lines="error")
    except FileNotFoundError:
        raise CatalogError(f"{path}: catalog table does not exist") from None
    except Exception as e:  # pandas raises many types for malformed files
        raise CatalogError(f"{path}: cannot read table: {e}") from e
    columns = dict(columns or {})
    columns.setdefault("image_path", columns.pop("image", "image_path"))
    unknown = {dst: src for dst, src in columns.items() if src not in raw.columns}
    if unknown:
        dst, src = next(iter(unknown.items()))
        raise CatalogError(f"{path}: column {src!r} (mapped to {dst!r}) not in table; columns are {list(raw.columns)}")
    df = raw.rename(columns={src: dst for dst, src in columns.items() if src != dst})
    df = df.loc[:, ~df.columns.duplicated()]
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
    # Row numbers in errors are 0-based data rows; +2 gives the CSV line (header is line 1).
    return validate_catalog(df, source=str(path), check_files=check_files)
