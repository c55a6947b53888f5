"""Shared test fixtures: where the real data lives, and what happens when a test's requirement is absent.

A test that needs something outside the venv says so declaratively:

- ``@pytest.mark.shared_data``: the real data under ``../shared/data`` (or ``$PRODCLASS_DATA``);
- ``@pytest.mark.system_package("chromium")``: a file a Debian package installs (the table
  :data:`SYSTEM_PACKAGES`; ``.ci/system-packages.sh``, run by ``make setup``, installs them).

Locally a missing requirement skips the test with the reason (and the install command). Under CI
(``CI=true``, set by ``.ci/run``) it fails the test instead: CI must run every test.
"""

import os
from pathlib import Path
from typing import NoReturn

import pytest

SHARED_DATA_REASON = "needs ../shared/data (set PRODCLASS_DATA)"

# Debian package -> the path the tests use from it. .ci/system-packages.sh checks the same paths.
SYSTEM_PACKAGES = {
    "chromium": Path("/usr/bin/chromium"),  # report.html and the Gradio demo in headless Chromium
    "dataset-fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),  # the real IDX files
}


def in_ci() -> bool:
    """True under CI (``CI=true``), where a missing requirement fails instead of skipping."""
    return os.environ.get("CI") == "true"


def apt_install_command(*packages: str) -> str:
    """The command that installs Debian ``packages`` (the one .ci/system-packages.sh prints)."""
    return "sudo apt-get install -y --no-install-recommends " + " ".join(packages)


def missing_requirement(reason: str) -> NoReturn:
    """Skip the calling test with ``reason``; under CI (``CI=true``) fail it instead."""
    if in_ci():
        pytest.fail(f"{reason} [CI=true: a missing requirement is a failure, not a skip]", pytrace=False)
    pytest.skip(reason)


def require_system(package: str, path: str | Path | None = None) -> Path:
    """``path`` (default: ``SYSTEM_PACKAGES[package]``) if present, else skip (fail under CI).

    Present means executable for a file (``chromium``) and searchable for a directory.
    """
    path = Path(path) if path is not None else SYSTEM_PACKAGES[package]
    if not os.access(path, os.X_OK):
        missing_requirement(f"needs {path} from Debian's {package}: {apt_install_command(package)} "
                            "(or `make setup` as root)")
    return path


def _data_root() -> Path:
    env = os.environ.get("PRODCLASS_DATA")
    return Path(env).resolve() if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def require_shared_data() -> Path:
    """The real data root if it holds ``abo-small``, else skip (fail under CI)."""
    root = _data_root()
    if not (root / "abo-small").is_dir():
        missing_requirement(f"{SHARED_DATA_REASON}; looked in {root}")
    return root


@pytest.fixture
def data_root() -> Path:
    """The real data root: ``$PRODCLASS_DATA``, else ``../shared/data`` beside the checkout."""
    return _data_root()


@pytest.hookimpl(tryfirst=True)  # before any fixture (e.g. tiny_run) is set up
def pytest_runtest_setup(item):
    for mark in item.iter_markers("system_package"):
        require_system(*mark.args, **mark.kwargs)
    if item.get_closest_marker("shared_data") is not None:
        require_shared_data()


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
    root = require_shared_data()
    from prodclass.config import validate_config
    from prodclass.pipeline import run

    base = tmp_path_factory.mktemp("tiny")
    csv = make_tiny_catalog(root, base / "catalog")
    cfg = validate_config(tiny_config(root, csv, base / "cache"))
    return run(cfg, root, run_dir=base / "run", progress=False, echo=lambda *_: None).run_dir


def stop_process(proc) -> None:
    """Terminate a server subprocess started by a test; kill it if it has not exited in 20 s."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
