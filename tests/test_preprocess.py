"""The one preprocessing path: odd but real image files, and clear errors for broken ones."""

import io

import numpy as np
import pytest
from PIL import Image

from prodclass.preprocess import ImageError, Preprocessing, load_image


def _jpeg(mode="RGB", size=(40, 30), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else (0, 255, 255, 0) if mode == "CMYK" else 128).save(buf, "JPEG")
    return buf.getvalue()


def test_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    cmyk = load_image(_jpeg("CMYK"))
    assert cmyk.mode == "RGB" and cmyk.getpixel((0, 0))[0] > 200  # cyan-free CMYK (0,255,255,0) is red
    assert load_image(_jpeg("L")).mode == "RGB"


def test_errors_name_the_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "trunc.jpg").write_bytes(_jpeg(size=(400, 300))[:300])
    (tmp_path / "text.jpg").write_text("hello")
    for name, msg in [("empty.jpg", "empty file"), ("trunc.jpg", "not a readable image"),
                      ("text.jpg", "not a readable image"), ("missing.jpg", "file does not exist")]:
        with pytest.raises(ImageError, match=rf"{name}: {msg}"):
            load_image(tmp_path / name)
    with pytest.raises(ImageError, match="more than 100 pixels"):
        load_image(_jpeg(size=(20, 20)), max_pixels=100)


def test_resize_crop_normalise():
    p = Preprocessing(input_size=8, resize_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    img = Image.new("RGB", (32, 16), (255, 0, 128))
    x = p(img)
    assert x.shape == (3, 8, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 4, 4], [1.0, -1.0, 128 / 255 * 2 - 1], atol=1e-2)
    assert Preprocessing.from_dict(p.to_dict()) == p


def test_exif_orientation_is_applied():
    """A phone photo stored sideways with EXIF Orientation=6 (rotate 90° CW) comes out upright."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # red on the stored left half
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    up = load_image(buf.getvalue())
    assert up.size == (20, 40)
    assert up.getpixel((10, 5))[0] > 200  # stored left is now the top
