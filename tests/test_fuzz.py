"""Fuzz tests (Hypothesis, issue 16): whatever bytes a reader is given, it returns a result or
raises the project's own error type (ImageError, CatalogError), never another exception.

Inputs are arbitrary bytes and mutated valid files (truncated, bytes flipped, chunks inserted),
so that the decoders and the CSV grammar are reached, not only the format checks at the start.
Each test is bounded (``max_examples``, no deadline: the first decode of a format is slow).
"""

import io
import os
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from prodclass.catalog import CatalogError, read_table
from prodclass.preprocess import ImageError, load_image
from prodclass.serving.batch import BadInput, expand_inputs

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_PIXELS = 4_000_000  # a mutated header may claim a huge image: refused by the same check, faster


def _samples() -> list[bytes]:
    """Small valid images in formats Pillow reads (some with an EXIF orientation, which
    ``load_image`` applies)."""
    img = Image.linear_gradient("L").resize((24, 16)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90°
    out = []
    for fmt, kw in [("PNG", {}), ("JPEG", {"quality": 80}), ("GIF", {}), ("BMP", {}), ("TIFF", {}),
                    ("WEBP", {}), ("ICO", {}), ("PPM", {}), ("PNG", {"transparency": 0}), ("TGA", {}),
                    ("PCX", {}), ("SGI", {}), ("QOI", {}), ("DDS", {}), ("JPEG", {"exif": exif}),
                    ("PNG", {"exif": exif}), ("WEBP", {"exif": exif})]:
        buf = io.BytesIO()
        (img.convert("L") if "transparency" in kw else img).save(buf, fmt, **kw)
        out.append(buf.getvalue())
    return out


SAMPLES = _samples()


@st.composite
def mutated(draw, samples: list[bytes]) -> bytes:
    """A sample with 1-6 edits: truncation, flipped bytes, inserted random bytes."""
    data = bytearray(draw(st.sampled_from(samples)))
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        edit = draw(st.sampled_from(["truncate", "flip", "insert", "set"]))
        if edit == "truncate":
            del data[at:]
        elif edit == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))
    return bytes(data)


any_image_bytes = st.one_of(st.binary(max_size=4096), mutated(SAMPLES))


def _check_image(result) -> None:
    assert isinstance(result, Image.Image) and result.mode == "RGB" and result.width * result.height > 0


@FUZZ
@given(data=any_image_bytes)
@example(data=b"")
@example(data=SAMPLES[0][:40])
def test_load_image_bytes(data):
    try:
        _check_image(load_image(data, max_pixels=MAX_PIXELS))
    except ImageError:
        pass


# Inputs the fuzzing found (Pillow 12.3.0) for which load_image used to raise another exception than
# ImageError; each is minimal. A malformed EXIF block on pixels that decode is not an error: the image
# is kept as it is (not rotated); every other case must be an ImageError.
BAD_EXIF = ("png-bad-exif", "webp-bad-exif")
KNOWN_ESCAPES = {
    # a malformed EXIF block: ImageOps.exif_transpose raised SyntaxError "not a TIFF file"
    "png-bad-exif": (b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x04\x00\x00\x00\x04\x08\x02\x00\x00\x00&\x93\t)'
                     b'\x00\x00\x00\x08eXIfXXXXXXXXA\x0c"\xbe\x00\x00\x00\x0cIDATx\x9cc` \x1d\x00\x00\x004\x00\x01v^'
                     b'\xae\xc3\x00\x00\x00\x00IEND\xaeB`\x82'),
    "webp-bad-exif": (b"RIFFF\x00\x00\x00WEBPVP8X\n\x00\x00\x00\x08\x00\x00\x00\x03\x00\x00\x03\x00\x00VP8 \x18\x00"
                      b"\x00\x000\x01\x00\x9d\x01*\x04\x00\x04\x00\x01@&%\xa4\x00\x03p\x00\xfe\xfd6h\x00EXIF\x08\x00"
                      b"\x00\x00XXXXXXXX"),
    # DdsImagePlugin raises NotImplementedError in Image.open for an unknown pixel format
    "dds-pixel-format": b"DDS |" + bytes(123),
    # QoiImagePlugin's decoder raises IndexError in img.load() on truncated data
    "qoi-truncated": b"qoif\x00\x00\x18\x00\x00\x00\x00\xa8\x00",
    # SpiderImagePlugin raises AttributeError ('stkoffset') in Image.open
    "spider-header": (b"\x00\x00\x80?" + bytes(14) + b"\x80?" + bytes(30) + b"0A" + bytes(34) + b"\x84D\x00\x00\xc0B"
                      + bytes(15) + b"@"),
}


@pytest.mark.parametrize("case", KNOWN_ESCAPES)
def test_load_image_known_escapes(case, tmp_path):
    data = KNOWN_ESCAPES[case]
    for src in (data, tmp_path / "img"):
        if isinstance(src, Path):
            src.write_bytes(data)
        if case in BAD_EXIF:
            img = load_image(src, max_pixels=MAX_PIXELS)
            assert img.mode == "RGB" and img.size[0] > 0
        else:
            with pytest.raises(ImageError, match="not a readable image"):
                load_image(src, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@FUZZ
@given(data=any_image_bytes)
@example(data=b"")
def test_load_image_path(scratch, data):
    path = scratch / "fuzz.img"
    path.write_bytes(data)
    try:
        _check_image(load_image(path, max_pixels=MAX_PIXELS))
    except ImageError as e:
        assert str(path) in str(e)  # the message names the file


# ---------------------------------------------------------------- catalogs

CSV_SAMPLES = [
    b"image_path,label\na.jpg,shoes\nb.jpg,chair\n",
    b'image_path,label,name\r\n"a.jpg",rug,"two\r\nlines"\r\nb.png,lamp,"say ""hi"""\r\n',
    b"\xef\xbb\xbfimage_path,label\n/abs/c.jpg,caf\xc3\xa9\n",
]
any_csv_bytes = st.one_of(st.binary(max_size=1024), mutated(CSV_SAMPLES),
                          st.binary(max_size=256).map(lambda b: b"image_path,label\n" + b))


@FUZZ
@given(data=any_csv_bytes)
@example(data=b"image_path,label\n\x00,x\n")
@example(data=b'image_path\n"open')
def test_read_table_csv(scratch, data):
    path = scratch / "catalog.csv"
    path.write_bytes(data)
    try:
        df = read_table(path, scratch, check_files=False)
    except CatalogError as e:
        assert str(path) in str(e)
        return
    assert isinstance(df, pd.DataFrame) and df["image_path"].map(lambda p: isinstance(p, str) and p != "").all()


@FUZZ
@given(data=any_csv_bytes, column=st.sampled_from([None, "label", "image_path"]))
@example(data=b"image_path\n\n\n", column=None)
def test_predict_catalog_parsing(scratch, data, column):
    path = scratch / "catalog.csv"
    path.write_bytes(data)
    try:
        entries = expand_inputs([str(path)], image_column=column, image_dir=scratch)
    except CatalogError as e:
        assert str(path) in str(e)
        return
    assert entries and all(isinstance(e, str) for e in entries)
    for e in entries:
        if isinstance(e, BadInput):
            assert e.reason.startswith(f"{path}: ")
        else:
            assert e.strip() and "\x00" not in e


@FUZZ
@given(name=st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\x00" not in b
                                                      and b not in (b".", b"..")))
def test_predict_folder_names(scratch, name):
    """Any file name (bytes, as Linux allows them) in a folder gives one entry."""
    folder = scratch / "names"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    (folder / os.fsdecode(name)).write_bytes(b"x")
    entries = expand_inputs([str(folder)])
    assert len(entries) == 1
