"""read_fashion_mnist on tiny IDX files, bad files, and (when installed) the real Debian files."""

import gzip
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prodclass.catalog import CatalogError
from prodclass.catalog.fashion_mnist import CLASSES, DEFAULT_DIR, read_fashion_mnist


def write_idx(path, magic, array, compress=False):
    data = np.array([magic, *array.shape], dtype=">i4").tobytes() + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def tiny_idx(folder, n_train=5, n_test=3, compress=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        suffix = ".gz" if compress else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", 2051, rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", 2049, np.arange(n) % 10, compress)
    return folder


@pytest.mark.parametrize("compress", [True, False])
def test_tiny_idx(tmp_path, compress):
    idx = tiny_idx(tmp_path / "idx", compress=compress)
    df = read_fashion_mnist(idx, cache_dir=tmp_path / "cache")
    assert list(df["image_id"]) == [f"train-{i:05d}" for i in range(5)] + [f"test-{i:05d}" for i in range(3)]
    assert list(df["source_split"]) == ["train"] * 5 + ["test"] * 3
    assert list(df["product_type"][:5]) == list(CLASSES[:5]) and list(df["class_index"][5:]) == [0, 1, 2]
    data = (idx / f"train-images-idx3-ubyte{'.gz' if compress else ''}").read_bytes()
    first = np.frombuffer((gzip.decompress(data) if compress else data)[16 : 16 + 784], np.uint8)
    assert (np.asarray(Image.open(df.at[0, "image_path"])) == first.reshape(28, 28)).all()
    assert len(read_fashion_mnist(idx, split="test", cache_dir=tmp_path / "cache")) == 3
    limited = read_fashion_mnist(idx, split="train", cache_dir=tmp_path / "cache", limit=2)
    assert list(limited["item_id"]) == ["train-00000", "train-00001"]


def test_cache_is_reused(tmp_path):
    idx = tiny_idx(tmp_path / "idx")
    df = read_fashion_mnist(idx, split="train", cache_dir=tmp_path / "cache", limit=2)
    png = Path(df.at[0, "image_path"])
    mtime = png.stat().st_mtime_ns
    df2 = read_fashion_mnist(idx, split="train", cache_dir=tmp_path / "cache")
    assert png.stat().st_mtime_ns == mtime and df2.at[0, "image_path"] == str(png) and len(df2) == 5
    assert not [p for p in png.parents[1].iterdir() if p.name.startswith(".")]  # no temp folders left


def idx_gz(*header, data=b""):
    return gzip.compress(np.array(header, ">i4").tobytes() + data)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("train-images-idx3-ubyte.gz", idx_gz(2049, 5, 28, 28), "bad IDX magic number 2049"),
        ("train-images-idx3-ubyte.gz", idx_gz(2051, 5, 32, 32, data=bytes(5 * 32 * 32)), "32×32, expected 28×28"),
        ("train-labels-idx1-ubyte.gz", idx_gz(2051, 5, data=bytes(5)), "bad IDX magic number 2051"),
        ("train-labels-idx1-ubyte.gz", idx_gz(2049, 5, data=bytes(4)), "header"),
        ("train-labels-idx1-ubyte.gz", idx_gz(2049, 4, data=bytes(4)), "4 images|5 images"),
        ("train-labels-idx1-ubyte.gz", idx_gz(2049, 5, data=bytes([0, 1, 2, 3, 10])), "label 10"),
        ("train-images-idx3-ubyte.gz", b"\x1f\x8b\x08\x00 not really gzip", "cannot read"),
    ],
)
def test_bad_files_name_the_file(tmp_path, name, content, message):
    idx = tiny_idx(tmp_path / "idx")
    (idx / name).write_bytes(content)
    with pytest.raises(CatalogError, match=message) as err:
        read_fashion_mnist(idx, split="train", cache_dir=tmp_path / "cache")
    assert name in str(err.value) or "train-images" in str(err.value)


def test_missing_files_and_bad_split(tmp_path):
    idx = tiny_idx(tmp_path / "idx")
    (idx / "t10k-labels-idx1-ubyte.gz").unlink()
    assert len(read_fashion_mnist(idx, split="train", cache_dir=tmp_path / "cache")) == 5
    with pytest.raises(CatalogError, match="t10k-labels-idx1-ubyte"):
        read_fashion_mnist(idx, cache_dir=tmp_path / "cache")
    with pytest.raises(CatalogError, match="unknown Fashion-MNIST split"):
        read_fashion_mnist(idx, split="val", cache_dir=tmp_path / "cache")


@pytest.mark.system_package("dataset-fashion-mnist", DEFAULT_DIR)
def test_real_train_split():
    """Full real train split, rendered into the default cache (~10 s the first time, ~0.5 s after)."""
    df = read_fashion_mnist(split="train")
    assert len(df) == 60000 and set(df["source_split"]) == {"train"}
    assert df["product_type"].value_counts().to_dict() == dict.fromkeys(CLASSES, 6000)
    assert df.at[0, "product_type"] == "Ankle boot"  # the first training label is 9
    assert np.asarray(Image.open(df.at[59999, "image_path"])).shape == (28, 28)
    start = time.perf_counter()
    again = read_fashion_mnist(split="train")
    assert time.perf_counter() - start < 5 and again.equals(df)
