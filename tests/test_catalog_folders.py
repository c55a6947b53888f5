"""read_folders on class-per-folder trees."""

import pytest
from PIL import Image

from prodclass.catalog import CatalogError
from prodclass.catalog.folders import read_folders


def img(path, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (10, 200, 10)).save(path, format=fmt)
    return path


def test_classes_extensions_hidden_and_nested(tmp_path):
    img(tmp_path / "shoes" / "a.jpg")
    img(tmp_path / "shoes" / "B.JPEG", "JPEG")
    img(tmp_path / "shoes" / "boots" / "c.png")  # nested: still class "shoes"
    img(tmp_path / "bags" / "d.WebP", "WEBP")
    img(tmp_path / "bags" / "e.bmp")
    img(tmp_path / "bags" / "f.gif")
    img(tmp_path / "bags" / ".hidden.jpg")
    img(tmp_path / ".cache" / "g.jpg")
    img(tmp_path / "bags" / ".thumbs" / "h.jpg")
    img(tmp_path / "stray.jpg")  # no class folder: ignored
    (tmp_path / "bags" / "notes.txt").write_text("not an image")
    df = read_folders(tmp_path)
    assert list(df["image_id"]) == ["bags/d", "bags/e", "bags/f", "shoes/B", "shoes/a", "shoes/boots/c"]
    assert (df["item_id"] == df["image_id"]).all() and df["is_main_image"].all()
    assert list(df["product_type"]) == ["bags"] * 3 + ["shoes"] * 3
    assert df.at[5, "image_path"] == str((tmp_path / "shoes" / "boots" / "c.png").resolve())
    assert list(read_folders(tmp_path, label="category")["category"]) == list(df["product_type"])


def test_empty_and_missing_roots(tmp_path):
    with pytest.raises(CatalogError, match="no images"):
        read_folders(tmp_path)
    (tmp_path / "shoes").mkdir()
    (tmp_path / "shoes" / "readme.md").write_text("x")
    img(tmp_path / "loose.png")
    with pytest.raises(CatalogError, match="no images"):
        read_folders(tmp_path)
    with pytest.raises(CatalogError, match="does not exist"):
        read_folders(tmp_path / "nope")


def test_same_stem_different_suffix(tmp_path):
    img(tmp_path / "shoes" / "a.jpg")
    img(tmp_path / "shoes" / "a.png")
    with pytest.raises(CatalogError, match="same image id 'shoes/a'"):
        read_folders(tmp_path)
