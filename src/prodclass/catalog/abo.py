"""Amazon Berkeley Objects (ABO) in its native layout → the Catalog table.

Format (https://amazon-berkeley-objects.s3.amazonaws.com/index.html, ABO README "Listings"):

- ``<root>/listings/metadata/listings_{0..f}.json.gz``: gzip'd JSON lines, one listing per line.
  Multilingual fields (``item_name``, ``brand``, ``color``, ``item_keywords``, ``bullet_point``,
  ``style``, ...) are lists of ``{"language_tag": "en_US", "value": ...}`` (``color`` entries may
  also carry ``standardized_values``); ``product_type`` is ``[{"value": "SHOES"}]``;
  ``main_image_id`` is a string, ``other_image_id`` a list of strings, ``node`` a list of
  ``{"node_id": int, "node_name": "/Categories/..."}``. Any field may be absent.
- ``<root>/images/metadata/images.csv.gz``: ``image_id,height,width,path`` with ``path``
  relative to ``<root>/images/small/``.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from . import CatalogError, validate_catalog
from .csvfile import read_csv_records

log = logging.getLogger(__name__)

#: Tried in order after the exact ``language`` tag: any English tag, then any tag at all
#: (i.e. the field's first entry). ``fnmatch`` patterns; an entry without a tag matches only ``*``.
DEFAULT_FALLBACK: tuple[str, ...] = ("en_*", "*")
#: Multilingual fields read into columns of the same name (one value: the first of the chosen tag).
SINGLE_FIELDS = ("item_name", "brand", "color")
#: Multilingual fields whose values for the chosen tag are joined with ``^`` (as abo-small does).
JOINED_FIELDS = ("item_keywords",)


def read_abo(
    root: str | Path,
    language: str = "en_US",
    check_files: bool = True,
    *,
    fallback: Sequence[str] = DEFAULT_FALLBACK,
    on_missing_image: Literal["error", "skip"] = "error",
    extra_fields: Sequence[str] = (),
) -> pd.DataFrame:
    """Read an ABO tree into a Catalog: one row per (listing, image).

    Columns: ``item_id``, ``image_id``, ``image_path`` (absolute, under ``<root>/images/small``),
    ``is_main_image`` (True for ``main_image_id``, False for each ``other_image_id``),
    ``product_type`` (lowercased, ``SHOES`` → ``shoes`` as in abo-small), ``item_name``, ``brand``,
    ``color`` (the language-picked ``value``, not ``standardized_values``), ``item_keywords``
    (the chosen tag's values joined with ``^``), ``node_path`` (the first ``node_name``),
    ``language`` (the tag ``item_name`` was taken from) and one column per ``extra_fields``
    entry (joined with ``^``). Absent fields are NaN.

    Language choice, per field and listing: the entry tagged ``language``, else the first entry
    matching each ``fallback`` pattern in turn (default: another ``en_*`` tag, then the first
    entry). ``fallback=()`` gives NaN when ``language`` is absent.

    Rows follow file order (``listings_0`` … ``listings_f``, then line order); within a listing
    the main image comes first and a repeated image id is kept once. An ``item_id`` already seen
    (ABO repeats some listings across files) is skipped: the first listing wins; the count is
    logged and stored in ``df.attrs["duplicate_items"]``. Listings without any image give no rows.

    Args:
        root: the ABO root (holds ``listings/`` and ``images/``).
        language: preferred ``language_tag``.
        check_files: fail if an image file does not exist.
        fallback: patterns tried after ``language`` (see above).
        on_missing_image: an image id absent from ``images.csv.gz``: ``"error"`` raises,
            ``"skip"`` drops that row (count logged, in ``df.attrs["missing_images"]``).
        extra_fields: more multilingual fields to keep, e.g. ``("bullet_point", "material")``.

    Raises:
        CatalogError: no listings files or no ``images.csv.gz``; an unreadable file; a malformed
            JSON line or a listing without ``item_id`` (names file and line); an image id not in
            ``images.csv.gz`` (names file, line and id); a missing image file (``check_files``).
    """
    if on_missing_image not in ("error", "skip"):
        raise ValueError(f"on_missing_image must be 'error' or 'skip', got {on_missing_image!r}")
    extra_fields = [f for f in dict.fromkeys(extra_fields) if f not in (*SINGLE_FIELDS, *JOINED_FIELDS)]
    root = Path(root).expanduser().resolve()
    listing_files = sorted(
        p for p in (root / "listings" / "metadata").glob("listings_*") if p.name.endswith((".json", ".json.gz"))
    )
    if not listing_files:
        raise CatalogError(f"{root}: no listings/metadata/listings_*.json.gz (is this an ABO root?)")
    paths = _read_image_paths(root / "images" / "metadata" / "images.csv.gz")
    rows, n_dup, n_missing = _listing_rows(listing_files, paths, f"{root}/images/small/", (language, *fallback),
                                           extra_fields, on_missing_image)
    if n_dup:
        log.info("%s: %d repeated item_id(s) skipped (first listing kept)", root, n_dup)
    if n_missing:
        log.warning("%s: %d image id(s) not in images.csv.gz skipped", root, n_missing)
    columns = ["item_id", "image_id", "image_path", "is_main_image", "product_type", *SINGLE_FIELDS,
               *JOINED_FIELDS, "node_path", "language", *extra_fields]
    df = validate_catalog(pd.DataFrame(rows, columns=columns), source=str(root), check_files=check_files)
    df.attrs.update(duplicate_items=n_dup, missing_images=n_missing)
    return df


def _listing_rows(listing_files: list[Path], paths: dict[str, str], small: str, prefs: tuple[str, ...],
                  extra_fields: list[str], on_missing_image: str) -> tuple[list[dict[str, Any]], int, int]:
    """One row per (listing, image) in file and line order; ``(rows, repeated items, missing image ids)``.

    Raises:
        CatalogError: a listing without ``item_id``, or (``on_missing_image="error"``) an image
            id absent from ``images.csv.gz`` (names file, line and id).
    """
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    n_dup = n_missing = 0
    for lf in listing_files:
        for lineno, obj in _json_lines(lf):
            item_id = obj.get("item_id")
            if not item_id:
                raise CatalogError(f"{lf}:{lineno}: listing has no item_id")
            if item_id in seen:
                n_dup += 1
                continue
            seen.add(item_id)
            main = obj.get("main_image_id")
            images = dict.fromkeys([main] if main else [])
            images.update(dict.fromkeys(obj.get("other_image_id") or []))
            fields = _listing_fields(obj, prefs, extra_fields) if images else {}
            for image_id in images:
                rel = paths.get(image_id)
                if rel is None and on_missing_image == "skip":
                    n_missing += 1
                elif rel is None:
                    raise CatalogError(
                        f"{lf}:{lineno}: item {item_id}: image id {image_id!r} not in images/metadata/images.csv.gz")
                else:
                    rows.append({"item_id": item_id, "image_id": image_id, "image_path": small + rel,
                                 "is_main_image": image_id == main, **fields})
    return rows, n_dup, n_missing


def _read_image_paths(path: Path) -> dict[str, str]:
    """``image_id`` → path relative to ``images/small`` from ABO's ``images.csv.gz``.

    Read strictly (:func:`prodclass.catalog.csvfile.read_csv_records`): a ragged row, bytes that
    are not UTF-8 or an empty ``image_id``/``path`` cell is an error naming the file and line.

    Raises:
        CatalogError: the file is missing, unreadable or malformed, or lacks ``image_id``/``path``.
    """
    if not path.is_file():
        raise CatalogError(f"{path}: ABO image metadata does not exist")
    columns, records = read_csv_records(path)
    missing = {"image_id", "path"} - set(columns)
    if missing:
        raise CatalogError(f"{path}: lacks column(s) {sorted(missing)}; has {columns}")
    i_id, i_path = columns.index("image_id"), columns.index("path")
    out: dict[str, str] = {}
    for r in records:
        error = r.error or next((f"line {r.line}, column {c!r}: empty" for c, i in (("image_id", i_id), ("path", i_path))
                                 if not r.cells[i].strip()), None)
        if error:
            raise CatalogError(f"{path}: {error}")
        out.setdefault(r.cells[i_id], r.cells[i_path])  # a repeated image id: the first row wins
    return out


def _json_lines(path: Path):
    """Yield ``(line number, dict)`` for each non-blank line of a (gzip'd) JSON-lines file."""
    opener = gzip.open if path.suffix == ".gz" else open
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CatalogError(f"{path}:{lineno}: malformed JSON: {e.msg} at column {e.colno}") from None
                if not isinstance(obj, dict):
                    raise CatalogError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise CatalogError(f"{path}:{lineno + 1}: cannot read: {e}") from e


def _listing_fields(obj: dict, prefs: Sequence[str], extra_fields: Sequence[str]) -> dict[str, Any]:
    """The Catalog's label/text values of one listing (NaN where absent)."""
    out: dict[str, Any] = {}
    ptype = _entries(obj.get("product_type"))
    out["product_type"] = str(ptype[0]["value"]).lower() if ptype and ptype[0].get("value") else np.nan
    tag = np.nan
    for field in (*SINGLE_FIELDS, *JOINED_FIELDS, *extra_fields):
        chosen, values = _pick(_entries(obj.get(field)), prefs)
        if field == "item_name" and chosen is not None:
            tag = chosen or np.nan
        if not values:
            out[field] = np.nan
        else:
            out[field] = values[0] if field in SINGLE_FIELDS else "^".join(values)
    nodes = _entries(obj.get("node"))
    out["node_path"] = nodes[0].get("node_name", np.nan) if nodes else np.nan
    out["language"] = tag
    return out


def _entries(value: Any) -> list[dict]:
    """A multilingual field as a list of dicts (a bare string becomes one untagged entry)."""
    if value is None:
        return []
    if not isinstance(value, list):
        value = [value]
    return [e if isinstance(e, dict) else {"value": e} for e in value]


def _pick(entries: list[dict], prefs: Sequence[str]) -> tuple[str | None, list[str]]:
    """The first tag in ``entries`` matching ``prefs`` (in order) and all its non-empty values."""
    tags = [e.get("language_tag") or "" for e in entries]
    for i, pattern in enumerate(prefs):
        tag = next((t for t in tags if (t == pattern if i == 0 else fnmatchcase(t, pattern))), None)
        if tag is not None:
            values = [e.get("value") for e, t in zip(entries, tags, strict=True) if t == tag]
            return tag, [str(v) for v in values if v not in ("", None)]
    return None, []
