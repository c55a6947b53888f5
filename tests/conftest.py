"""Shared test fixtures: where the real data lives, and skipping ``shared_data`` tests without it."""

import os
from pathlib import Path

import pytest

SHARED_DATA_REASON = "needs ../shared/data (set PRODCLASS_DATA)"


def _data_root() -> Path:
    env = os.environ.get("PRODCLASS_DATA")
    return Path(env).resolve() if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def data_root() -> Path:
    """The real data root: ``$PRODCLASS_DATA``, else ``../shared/data`` beside the checkout."""
    return _data_root()


def pytest_collection_modifyitems(config, items):
    if (_data_root() / "abo-small").is_dir():
        return
    skip = pytest.mark.skip(reason=SHARED_DATA_REASON)
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)


TINY_CLASSES = ("shoes", "chair", "rug", "suitcase", "light_bulb")


def make_tiny_catalog(data_root: Path, out_dir: Path, per_class: int = 16) -> Path:
    """A real-format abo-small catalog.csv holding ``per_class`` rows of 5 product types,
    pointing at the real images (written to ``out_dir/catalog.csv``)."""
    import pandas as pd

    cat = pd.read_csv(data_root / "abo-small" / "catalog.csv")
    cat = cat[cat["product_type"].isin(TINY_CLASSES)].groupby("product_type").head(per_class)
    out_dir.mkdir(parents=True, exist_ok=True)
    cat.to_csv(out_dir / "catalog.csv", index=False)
    return out_dir / "catalog.csv"


def tiny_config(data_root: Path, catalog_csv: Path, cache_dir: Path, **train) -> dict:
    """Config mapping for a fast run on :func:`make_tiny_catalog` output."""
    return {
        "name": "tiny",
        "data": {"source": "table", "path": str(catalog_csv), "image_dir": str(data_root / "abo-small" / "images"),
                 "columns": {"image_path": "image_name", "item_name": "name", "item_keywords": "keywords"},
                 "label": "product_type"},
        "curation": {"min_per_class": 5, "split": {"train": 0.6, "val": 0.2, "test": 0.2}},
        "train": {"epochs": 30, "patience": 10, **train},
        "embed": {"cache_dir": str(cache_dir)},
    }


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A complete run directory trained on 5 abo-small classes × 16 images (~20 s on 2 cores).

    Session-scoped and read-only by convention: tests that modify a run copy it first
    (``shutil.copytree(tiny_run, tmp_path / "run")``).
    """
    root = _data_root()
    if not (root / "abo-small").is_dir():
        pytest.skip(SHARED_DATA_REASON)
    from prodclass.config import validate_config
    from prodclass.pipeline import run

    base = tmp_path_factory.mktemp("tiny")
    csv = make_tiny_catalog(root, base / "catalog")
    cfg = validate_config(tiny_config(root, csv, base / "cache"))
    return run(cfg, root, run_dir=base / "run", progress=False, echo=lambda *_: None).run_dir
