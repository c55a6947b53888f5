"""A class-per-folder image tree (``root/<class>/<image>``, the torchvision ``ImageFolder`` layout)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from . import CatalogError, validate_catalog

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})


def read_folders(root: str | Path, label: str = "product_type", check_files: bool = True) -> pd.DataFrame:
    """Read ``root/<class>/.../<image>`` into a Catalog: one row per image file.

    The first-level folder name is the class; images in deeper subfolders belong to their
    first-level folder (``root/shoes/boots/a.jpg`` → class ``shoes``). Image files directly in
    ``root`` have no class and are ignored (count logged). Files and folders whose name starts
    with ``.`` are ignored, as are files whose suffix is not one of :data:`IMAGE_SUFFIXES`
    (case-insensitive). Symlinked class folders and files are followed.

    Columns: ``item_id`` = ``image_id`` = the path relative to ``root`` without suffix, with ``/``
    separators (``shoes/boots/a``); ``image_path`` (absolute); ``is_main_image`` (always True:
    one image per item); ``label`` (the class folder name). Rows are sorted by relative path.

    Raises:
        CatalogError: ``root`` is not a folder; it holds no image in any class folder; two
            files differ only in suffix (``a.jpg`` and ``a.png`` would share an id).
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise CatalogError(f"{root}: image folder does not exist")
    rows, ids = [], {}
    stray = 0
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            stray += entry.suffix.lower() in IMAGE_SUFFIXES
            continue
        for dirpath, dirnames, filenames in os.walk(entry):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                path = Path(dirpath, name)
                if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                rel = path.relative_to(root).with_suffix("").as_posix()
                if rel in ids:
                    raise CatalogError(f"{dirpath}: {ids[rel]} and {path.name} give the same image id {rel!r}")
                ids[rel] = path.name
                rows.append({"item_id": rel, "image_id": rel, "image_path": str(path), "is_main_image": True,
                             label: entry.name})
    if stray:
        log.warning("%s: %d image(s) directly in the root folder ignored (no class folder)", root, stray)
    if not rows:
        raise CatalogError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in any class folder")
    return validate_catalog(pd.DataFrame(rows), source=str(root), check_files=check_files)
