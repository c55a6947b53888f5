"""read_table on abo-small-style and styles.csv-style tables (same column layouts as the real files)."""

import pandas as pd
import pytest
from PIL import Image

from prodclass.catalog import CatalogError, read_table

ABO_SMALL_COLUMNS = {"image_path": "image_name", "item_name": "name", "item_keywords": "keywords"}
STYLES_COLUMNS = {
    "image_path": "id", "product_type": "articleType", "color": "baseColour", "item_name": "productDisplayName"
}


def jpg(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 8), (128, 128, 128)).save(path)


@pytest.fixture
def abo_small(tmp_path):
    """abo-small's layout: ``catalog.csv`` (image_name,name,product_type,color,keywords) + ``images/``."""
    (tmp_path / "catalog.csv").write_text(
        "image_name,name,product_type,color,keywords\n"
        '00020b5a.jpg,"find. women\'s kitten heel court, white, 7 uk",shoes,white,uk\n'
        '0004bef1.jpg,amazon brand - solimo single bed,bed,sienna cherry,"single size bed^wooden beds^bed"\n'
        "0007ab12.jpg,stone & beam sofa,sofa,,\n"
    )
    for name in ("00020b5a", "0004bef1", "0007ab12"):
        jpg(tmp_path / "images" / f"{name}.jpg")
    return tmp_path


@pytest.fixture
def styles(tmp_path):
    """fashion-product-images' layout: ``styles.csv`` (id → ``images/<id>.jpg``) + ``images/``."""
    (tmp_path / "styles.csv").write_text(
        "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName\n"
        "15970,Men,Apparel,Topwear,Shirts,Navy Blue,Fall,2011,Casual,Turtle Check Men Navy Blue Shirt\n"
        "39386,Men,Apparel,Bottomwear,Jeans,Blue,Summer,2012,Casual,Peter England Men Party Blue Jeans\n"
        "59263,Women,Accessories,Watches,Watches,Silver,Winter,2016,Casual,Titan Women Silver Watch\n"
    )
    for name in ("15970", "39386", "59263"):
        jpg(tmp_path / "images" / f"{name}.jpg")
    return tmp_path


def test_abo_small_layout(abo_small):
    df = read_table(abo_small / "catalog.csv", abo_small / "images", columns=ABO_SMALL_COLUMNS)
    assert list(df["image_id"]) == ["00020b5a", "0004bef1", "0007ab12"]
    assert (df["item_id"] == df["image_id"]).all() and df["is_main_image"].all()
    assert df.at[0, "item_name"] == "find. women's kitten heel court, white, 7 uk"
    assert df.at[1, "item_keywords"] == "single size bed^wooden beds^bed"
    assert pd.isna(df.at[2, "color"]) and pd.isna(df.at[2, "item_keywords"])
    assert df.at[0, "image_path"] == str((abo_small / "images" / "00020b5a.jpg").resolve())


def test_styles_layout(styles):
    df = read_table(styles / "styles.csv", styles / "images", columns=STYLES_COLUMNS)
    assert list(df["image_id"]) == ["15970", "39386", "59263"]
    assert list(df["product_type"]) == ["Shirts", "Jeans", "Watches"]
    assert list(df["color"]) == ["Navy Blue", "Blue", "Silver"]
    assert df.at[2, "masterCategory"] == "Accessories" and df.at[0, "year"] == "2011"  # unmapped columns kept
    assert df.at[1, "image_path"].endswith("/images/39386.jpg")


def test_unknown_column_is_named(abo_small):
    columns = {"image_path": "image_name", "item_name": "title"}
    message = r"column 'title' \(mapped to 'item_name'\) not in table; columns are \['image_name'"
    with pytest.raises(CatalogError, match=message):
        read_table(abo_small / "catalog.csv", abo_small / "images", columns=columns)


def test_missing_image_names_the_row(styles):
    (styles / "images" / "39386.jpg").unlink()
    with pytest.raises(CatalogError, match=r"styles\.csv: row 1: image file .*39386\.jpg does not exist"):
        read_table(styles / "styles.csv", styles / "images", columns=STYLES_COLUMNS)
    assert len(read_table(styles / "styles.csv", styles / "images", columns=STYLES_COLUMNS, check_files=False)) == 3


def test_missing_table(tmp_path):
    with pytest.raises(CatalogError, match="does not exist"):
        read_table(tmp_path / "nope.csv", tmp_path)


@pytest.mark.shared_data
def test_real_abo_small(data_root):
    root = data_root / "abo-small"
    df = read_table(root / "catalog.csv", root / "images", columns=ABO_SMALL_COLUMNS)
    assert len(df) == 8037 and df["image_id"].is_unique
    assert df["product_type"].value_counts().index[0] == "shoes"
