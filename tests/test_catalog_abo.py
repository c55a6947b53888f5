"""read_abo on small ABO trees written field for field like the published ABO listings."""

import gzip
import hashlib
import json
import logging

import pandas as pd
import pytest
from PIL import Image

from prodclass.catalog import CatalogError
from prodclass.catalog.abo import read_abo


def tag(language, *values, **extra):
    return [{"language_tag": language, "value": v, **extra} for v in values]


def write_abo(root, listings, images=None, raw_lines=None):
    """Write ``root/listings/metadata/listings_<k>.json.gz`` (one file per list in ``listings``) and
    ``root/images/metadata/images.csv.gz`` + tiny JPEGs under ``root/images/small/<xx>/<hash>.jpg``.

    ``images``: the image ids to list (default: every id the listings name). ``raw_lines``: extra
    literal lines appended to the last listings file.
    """
    meta = root / "listings" / "metadata"
    meta.mkdir(parents=True)
    for k, file_listings in enumerate(listings):
        lines = [json.dumps(obj) for obj in file_listings]
        if k == len(listings) - 1:
            lines += raw_lines or []
        with gzip.open(meta / f"listings_{k:x}.json.gz", "wt", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    if images is None:
        named = [[obj.get("main_image_id"), *obj.get("other_image_id", [])] for fl in listings for obj in fl]
        images = [i for ids in named for i in ids if i]
    rows = []
    for image_id in dict.fromkeys(images):
        name = hashlib.sha1(image_id.encode()).hexdigest()[:8]
        rel = f"{name[:2]}/{name}.jpg"
        (root / "images" / "small" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6), (200, 30, 30)).save(root / "images" / "small" / rel, quality=80)
        rows.append({"image_id": image_id, "height": 6, "width": 8, "path": rel})
    (root / "images" / "metadata").mkdir(parents=True)
    pd.DataFrame(rows, columns=["image_id", "height", "width", "path"]).to_csv(
        root / "images" / "metadata" / "images.csv.gz", index=False
    )
    return root


FULL = {  # every field of the ABO README's listing schema
    "brand": tag("en_US", "Amazon Brand - Find."),
    "bullet_point": tag("en_US", "Leather upper", "Rubber sole"),
    "color": tag("en_US", "White", standardized_values=["White"]),
    "color_code": ["#FFFFFF"],
    "country": "GB",
    "domain_name": "amazon.co.uk",
    "fabric_type": tag("en_GB", "Leather"),
    "finish_type": tag("en_US", "Matte"),
    "item_dimensions": {
        "height": {"normalized_value": {"unit": "inches", "value": 4.0}, "unit": "inches", "value": 4.0},
        "length": {"normalized_value": {"unit": "inches", "value": 10.0}, "unit": "inches", "value": 10.0},
        "width": {"normalized_value": {"unit": "inches", "value": 3.5}, "unit": "inches", "value": 3.5},
    },
    "item_id": "B06X9STHNG",
    "item_keywords": tag("en_US", "court shoes", "kitten heel", "womens shoes"),
    "item_name": tag("en_US", "find. Women's Kitten Heel Court, White, 7 UK"),
    "item_shape": tag("en_US", "Pointed"),
    "item_weight": [{"normalized_value": {"unit": "pounds", "value": 1.2}, "unit": "pounds", "value": 1.2}],
    "main_image_id": "81iZlv3bjpL",
    "marketplace": "Amazon",
    "material": tag("en_US", "Leather"),
    "model_name": tag("en_US", "Kitten heel court"),
    "model_number": [{"value": "F-1234"}],
    "model_year": [{"value": 2017}],
    "node": [{"node_id": 1769798031, "node_name": "/Categories/Shoes/Women's Shoes/Court Shoes"}],
    "other_image_id": ["71P1IdXvQHL", "81Fc9aN1ZzL"],
    "pattern": tag("en_US", "Solid"),
    "product_description": tag("en_US", "A classic court shoe."),
    "product_type": [{"value": "SHOES"}],
    "spin_id": "3b1c6a4e",
    "style": tag("en_US", "Court"),
    "3dmodel_id": "B06X9STHNG",
}


def test_full_listing(tmp_path):
    df = read_abo(write_abo(tmp_path, [[FULL]]))
    assert list(df["image_id"]) == ["81iZlv3bjpL", "71P1IdXvQHL", "81Fc9aN1ZzL"]
    assert list(df["is_main_image"]) == [True, False, False]
    assert df["is_main_image"].dtype == bool
    row = df.iloc[0]
    assert row["item_id"] == "B06X9STHNG"
    assert row["product_type"] == "shoes"
    assert row["item_name"] == "find. Women's Kitten Heel Court, White, 7 UK"
    assert row["brand"] == "Amazon Brand - Find."
    assert row["color"] == "White"
    assert row["item_keywords"] == "court shoes^kitten heel^womens shoes"
    assert row["node_path"] == "/Categories/Shoes/Women's Shoes/Court Shoes"
    assert row["language"] == "en_US"
    for p in df["image_path"]:
        assert p.startswith(str(tmp_path / "images" / "small")) and Image.open(p).size == (8, 6)
    assert (df["item_name"] == row["item_name"]).all()  # listing fields repeat on every image row


def test_missing_fields_are_nan(tmp_path):
    bare = {"item_id": "B0000BARE1", "item_name": tag("en_US", "Plain mug"), "main_image_id": "61bare1L"}
    df = read_abo(write_abo(tmp_path, [[bare]]))
    assert len(df) == 1
    for col in ("brand", "color", "item_keywords", "product_type", "node_path"):
        assert pd.isna(df.at[0, col]), col


def test_language_choice_and_fallback(tmp_path):
    german = {"item_id": "B0000DE001", "item_name": tag("de_DE", "Stuhl aus Holz"), "main_image_id": "71de1L",
              "color": tag("de_DE", "Braun", standardized_values=["Brown"])}
    mixed = {
        "item_id": "B0000MIX01", "main_image_id": "71mix1L",
        "item_name": tag("fr_FR", "Chaise") + tag("en_GB", "Chair (GB)") + tag("en_US", "Chair"),
        "brand": tag("es_MX", "Marca") + tag("en_IN", "Brand IN"),
        "item_keywords": tag("de_DE", "stuhl") + tag("en_US", "chair", "seat") + tag("en_GB", "armchair"),
    }
    root = write_abo(tmp_path, [[german, mixed]])
    df = read_abo(root).set_index("item_id")
    assert df.at["B0000DE001", "item_name"] == "Stuhl aus Holz"  # no English: first entry
    assert df.at["B0000DE001", "color"] == "Braun"  # the value, not standardized_values
    assert df.at["B0000DE001", "language"] == "de_DE"
    assert df.at["B0000MIX01", "item_name"] == "Chair"  # en_US although not first
    assert df.at["B0000MIX01", "brand"] == "Brand IN"  # another en_* tag before a non-English first
    assert df.at["B0000MIX01", "item_keywords"] == "chair^seat"  # only the chosen tag's values

    de = read_abo(root, language="de_DE").set_index("item_id")
    assert de.at["B0000MIX01", "item_keywords"] == "stuhl"
    assert de.at["B0000MIX01", "item_name"] == "Chair (GB)"  # no de_DE: first en_* entry

    strict = read_abo(root, fallback=()).set_index("item_id")
    assert pd.isna(strict.at["B0000DE001", "item_name"]) and strict.at["B0000MIX01", "item_name"] == "Chair"

    extra = read_abo(root, extra_fields=["bullet_point"])
    assert "bullet_point" in extra.columns and extra["bullet_point"].isna().all()


def test_image_rows_duplicates_and_listings_without_images(tmp_path):
    only_others = {"item_id": "B0000OTHR1", "other_image_id": ["51o1L", "51o2L", "51o1L"],
                   "product_type": [{"value": "CHAIR"}]}
    no_images = {"item_id": "B0000NONE1", "item_name": tag("en_US", "Nothing to see")}
    main_repeated = {"item_id": "B0000REP01", "main_image_id": "61r1L", "other_image_id": ["61r1L", "61r2L"]}
    again = {**main_repeated, "item_name": tag("en_US", "second copy"), "main_image_id": "61r9L"}
    df = read_abo(write_abo(tmp_path, [[only_others, no_images, main_repeated], [again]]))
    assert list(zip(df["item_id"], df["image_id"], df["is_main_image"], strict=True)) == [
        ("B0000OTHR1", "51o1L", False), ("B0000OTHR1", "51o2L", False),
        ("B0000REP01", "61r1L", True), ("B0000REP01", "61r2L", False),
    ]  # first listing of a repeated item_id wins (listings_0 before listings_1)
    assert df.attrs["duplicate_items"] == 1


def test_missing_image_id_errors_or_skips(tmp_path, caplog):
    listing = {**FULL, "other_image_id": ["71P1IdXvQHL", "ghost00000L"]}
    known = ["81iZlv3bjpL", "71P1IdXvQHL", "81Fc9aN1ZzL"]
    root = write_abo(tmp_path, [[FULL], [listing | {"item_id": "B0000SECND"}]], images=known)
    with pytest.raises(CatalogError, match=r"listings_1\.json\.gz:1: .*'ghost00000L'"):
        read_abo(root)
    with caplog.at_level(logging.WARNING):
        df = read_abo(root, on_missing_image="skip")
    assert len(df) == 5 and "ghost00000L" not in set(df["image_id"]) and df.attrs["missing_images"] == 1
    assert "1 image id(s)" in caplog.text


def test_malformed_line_names_file_and_line(tmp_path):
    root = write_abo(tmp_path, [[FULL]], raw_lines=["", '{"item_id": "B0BROKEN", "main_image_id": '])
    with pytest.raises(CatalogError, match=r"listings_0\.json\.gz:3: malformed JSON"):
        read_abo(root)


def test_missing_image_file_and_layout_errors(tmp_path):
    root = write_abo(tmp_path / "abo", [[FULL]])
    next((root / "images" / "small").rglob("*.jpg")).unlink()
    with pytest.raises(CatalogError, match="does not exist"):
        read_abo(root)
    assert len(read_abo(root, check_files=False)) == 3
    with pytest.raises(CatalogError, match="no listings"):
        read_abo(tmp_path / "empty")
    (root / "images" / "metadata" / "images.csv.gz").unlink()
    with pytest.raises(CatalogError, match="images.csv.gz"):
        read_abo(root)


def test_image_metadata_is_read_strictly(tmp_path):
    """A short row of images.csv.gz used to give a NaN path (a TypeError later); now it is an
    error naming the file and line."""
    root = write_abo(tmp_path / "abo", [[FULL]])
    meta = root / "images" / "metadata" / "images.csv.gz"
    lines = gzip.decompress(meta.read_bytes()).decode().splitlines()
    image_id = lines[2].split(",")[0]
    meta.write_bytes(gzip.compress("\n".join([*lines[:2], f"{image_id},6,8", *lines[3:]]).encode() + b"\n"))
    with pytest.raises(CatalogError, match=r"images\.csv\.gz: line 3, column 'path': missing; 3 fields"):
        read_abo(root)
    meta.write_bytes(b"not gzip data")
    with pytest.raises(CatalogError, match=r"images\.csv\.gz: cannot read"):
        read_abo(root)
