"""Catalog sources → the one Catalog table (ARCHITECTURE.md, "The nouns").

A Catalog is a pandas DataFrame with one row per image:

=================  ======  =====================================================
column             dtype   meaning
=================  ======  =====================================================
``item_id``        str     product (listing) id; ABO ``item_id``
``image_id``       str     image id; ABO ``image_id`` / file stem
``image_path``     str     absolute path of the image file
``is_main_image``  bool    the product's main image (ABO ``main_image_id``)
label columns      str     ``product_type``, ``color``, ``brand``, ... (may be missing)
text columns       str     ``item_name``, ``item_keywords``, ... (may be missing)
=================  ======  =====================================================

Every reader returns :func:`validate_catalog`'s output. Readers never train and never decode
images; missing files are reported here, corrupt ones when an image is first decoded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

REQUIRED_COLUMNS = ("item_id", "image_id", "image_path", "is_main_image")
LABEL_COLUMNS = ("product_type", "color", "brand", "node_path")
TEXT_COLUMNS = ("item_name", "item_keywords")


class CatalogError(ValueError):
    """A catalog that cannot be read; the message names the file, row and what is wrong."""


def validate_catalog(df: pd.DataFrame, source: str, check_files: bool = True,
                     lines: Sequence[int] | None = None) -> pd.DataFrame:
    """Check and normalise a Catalog table.

    Args:
        df: one row per image with at least :data:`REQUIRED_COLUMNS`.
        source: file or folder the rows came from (used in error messages).
        check_files: also check that every ``image_path`` exists.
        lines: for a table read from a text file, the 1-based line each row starts on; error
            messages then give it after the 0-based row number (``row 1: ... (line 3)``).

    Returns:
        A copy with string ids, boolean ``is_main_image``, a fresh RangeIndex.

    Raises:
        CatalogError: a required column is missing, a required value is empty, an
            ``(item_id, image_id)`` pair repeats, or an image file does not exist.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise CatalogError(f"{source}: catalog lacks required column(s) {missing}; has {list(df.columns)}")
    df = df.reset_index(drop=True).copy()

    def at(row: int) -> str:
        return f" (line {lines[row]})" if lines is not None and row < len(lines) else ""

    for col in ("item_id", "image_id", "image_path"):
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if empty.any():
            row = int(empty.idxmax())
            raise CatalogError(f"{source}: row {row}: empty {col}{at(row)}")
        df[col] = df[col].astype(str)
    df["is_main_image"] = df["is_main_image"].astype(bool)
    dup = df.duplicated(["item_id", "image_id"])
    if dup.any():
        row = int(dup.idxmax())
        raise CatalogError(
            f"{source}: row {row}: item_id={df.at[row, 'item_id']!r} image_id={df.at[row, 'image_id']!r} "
            f"appears twice{at(row)}"
        )
    if check_files:
        exists = df["image_path"].map(lambda p: Path(p).is_file())
        if not exists.all():
            row = int((~exists).idxmax())
            n = int((~exists).sum())
            raise CatalogError(
                f"{source}: row {row}: image file {df.at[row, 'image_path']} does not exist{at(row)}"
                + (f" ({n} missing in all)" if n > 1 else "")
            )
    return df


from .table import read_table  # noqa: E402  (readers need the names above)

__all__ = ["CatalogError", "validate_catalog", "read_table", "read_catalog", "REQUIRED_COLUMNS"]


def read_catalog(data_cfg, data_root: Path) -> pd.DataFrame:
    """Read the catalog a :class:`prodclass.config.DataConfig` describes.

    Relative paths in the config are resolved against ``data_root``.

    Raises:
        CatalogError: as raised by the reader for ``data_cfg.source``.
    """
    from prodclass.config import resolve_data_path

    path = resolve_data_path(data_cfg.path, data_root)
    if data_cfg.source == "table":
        image_dir = resolve_data_path(data_cfg.image_dir, data_root) if data_cfg.image_dir else path.parent
        return read_table(path, image_dir, columns=data_cfg.columns)
    if data_cfg.source == "abo":
        from .abo import read_abo

        return read_abo(path, language=data_cfg.language)
    if data_cfg.source == "folders":
        from .folders import read_folders

        return read_folders(path, label=data_cfg.label)
    if data_cfg.source == "fashion_mnist":
        from .fashion_mnist import read_fashion_mnist

        return read_fashion_mnist(path, split=data_cfg.split)
    raise CatalogError(f"unknown catalog source {data_cfg.source!r}")
