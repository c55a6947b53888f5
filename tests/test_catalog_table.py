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


# ---------------------------------------------------------------- issue 16: strict CSV reading


def test_ragged_rows_name_file_line_and_column(abo_small):
    """A row with a field too many used to fail with pandas' tokenizer message (or, as the first
    row, shift the image name into the index); a row with a field too few was padded silently."""
    csv = abo_small / "catalog.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([lines[0], lines[1], lines[2] + ",extra", lines[3]]) + "\n")
    with pytest.raises(CatalogError, match=r"catalog\.csv: line 3: 6 fields but the header has 5 columns"):
        read_table(csv, abo_small / "images", columns=ABO_SMALL_COLUMNS)
    csv.write_text("\n".join([lines[0], lines[1], "0004bef1.jpg,bed frame,bed", lines[3]]) + "\n")
    with pytest.raises(CatalogError, match=r"catalog\.csv: line 3, column 'color': missing; 3 fields but the header has 5"):
        read_table(csv, abo_small / "images", columns=ABO_SMALL_COLUMNS)
    csv.write_text("\n".join([lines[0], lines[1] + ",x", lines[2] + ",x", lines[3]]) + "\n")
    with pytest.raises(CatalogError, match=r"line 2: 6 fields .* \(2 malformed rows in all\)"):
        read_table(csv, abo_small / "images", columns=ABO_SMALL_COLUMNS)


def test_encoding_errors_name_line_and_column(abo_small):
    csv = abo_small / "catalog.csv"
    raw = csv.read_bytes().replace(b"stone & beam sofa", b"stone & beam canap\xe9")
    csv.write_bytes(raw)
    with pytest.raises(CatalogError, match=r"catalog\.csv: line 4, column 'name': not valid UTF-8 \(byte 0xe9\)"):
        read_table(csv, abo_small / "images", columns=ABO_SMALL_COLUMNS)
    csv.write_bytes(b"\xef\xbb\xbf" + raw.replace(b"canap\xe9", b"canap\xc3\xa9"))  # UTF-8 with a BOM is fine
    df = read_table(csv, abo_small / "images", columns=ABO_SMALL_COLUMNS)
    assert df.at[2, "item_name"] == "stone & beam canapé" and "image_name" not in df.columns


def test_empty_image_cells_and_empty_files(abo_small, tmp_path):
    csv = abo_small / "catalog.csv"
    csv.write_text(csv.read_text().replace("0004bef1.jpg,", ",", 1))
    with pytest.raises(CatalogError, match=r"catalog\.csv: line 3, column 'image_name': empty image path"):
        read_table(csv, abo_small / "images", columns=ABO_SMALL_COLUMNS, check_files=False)
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(CatalogError, match=r"empty\.csv: empty file \(no header row\)"):
        read_table(tmp_path / "empty.csv", tmp_path)
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(CatalogError, match=r"folder\.csv: is a folder"):
        read_table(tmp_path / "folder.csv", tmp_path)


def test_unreadable_table_names_the_file(abo_small, monkeypatch):
    """A catalog the user may not read: PermissionError used to escape (tests run as root, so the
    refusal is simulated)."""
    from pathlib import Path

    real = Path.read_bytes

    def refuse(self):
        if self.name == "catalog.csv":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(CatalogError, match=r"catalog\.csv: cannot read \(Permission denied\)"):
        read_table(abo_small / "catalog.csv", abo_small / "images", columns=ABO_SMALL_COLUMNS)


def test_missing_image_gives_the_csv_line(styles):
    styles_csv = styles / "styles.csv"
    text = styles_csv.read_text().replace("Turtle Check Men Navy Blue Shirt", '"Turtle Check\nMen Navy Blue Shirt"')  # a quoted line break
    styles_csv.write_text(text)
    (styles / "images" / "39386.jpg").unlink()
    with pytest.raises(CatalogError, match=r"styles\.csv: row 1: image file .*39386\.jpg does not exist \(line 4\)"):
        read_table(styles_csv, styles / "images", columns=STYLES_COLUMNS)


def test_csv_records_lines_and_grammar_errors(tmp_path):
    from prodclass.catalog.csvfile import read_csv_records

    (tmp_path / "t.csv").write_bytes(b'a,b\r\n1,"x\r\ny"\r\n\r\n2,"bad"quote\r\n3,4\r\n"5,open')
    columns, records = read_csv_records(tmp_path / "t.csv")
    assert columns == ["a", "b"]
    assert [(r.line, r.cells, r.error) for r in records] == [
        (2, ("1", "x\r\ny"), None), (5, (), "line 5: malformed CSV (',' expected after '\"')"), (6, ("3", "4"), None),
        (7, (), "line 7: malformed CSV (unexpected end of data)")]
    (tmp_path / "d.csv").write_text("a,a\n1,2\n")
    with pytest.raises(CatalogError, match=r"d\.csv: line 1: the header names column 'a' twice \(fields 1 and 2\)"):
        read_csv_records(tmp_path / "d.csv")
