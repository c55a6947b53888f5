"""The one preprocessing path: odd but real image files, and clear errors for broken ones."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from prodclass.preprocess import _RESAMPLE, ImageError, Preprocessing, load_image


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


def _reference_resize_crop(p: Preprocessing, img: Image.Image) -> Image.Image:
    """The resize → crop of every published model (before the bounded path existed), kept verbatim."""
    w, h = img.size
    scale = p.resize_size / min(w, h)
    nw, nh = max(p.input_size, round(w * scale)), max(p.input_size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _RESAMPLE[p.interpolation])
    left, top = (nw - p.input_size) // 2, (nh - p.input_size) // 2
    if (nw, nh) != (p.input_size, p.input_size):
        img = img.crop((left, top, left + p.input_size, top + p.input_size))
    return img


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(224, 224), (60, 80), (80, 60), (1000, 250), (250, 1000), (3000, 190),
                                  (190, 3000), (17, 13), (1024, 1023)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_normal_aspect_ratios_are_bit_identical(size, interpolation):
    """Up to MAX_RESIZE_FACTOR (16:1) the full resize then crop is kept, so outputs are unchanged."""
    p = Preprocessing(interpolation=interpolation)
    img = _noise(*size)
    assert np.array_equal(p.normalize(p.resize_crop(img)), p.normalize(_reference_resize_crop(p, img)))


@pytest.mark.shared_data
def test_real_images_are_bit_identical(data_root):
    """60 real catalog photos (abo-small, plus non-square fashion-product-images) give exactly the
    float32 arrays of the reference path the published accuracy was measured with."""
    abo = sorted((data_root / "abo-small" / "images").rglob("*.jpg"))[::97][:50]
    other = sorted((data_root / "fashion-product-images").rglob("*.jpg"))[:10]
    p = Preprocessing()
    nonsquare = 0
    for path in abo + other:
        img = load_image(path)
        nonsquare += img.width != img.height
        assert np.array_equal(p(path), p.normalize(_reference_resize_crop(p, img))), path
    assert len(abo) == 50 and nonsquare >= 10


@pytest.mark.parametrize("size", [(4000, 100), (100, 4000)])
def test_very_elongated_images_resample_only_the_crop(size):
    """Beyond 16:1 only the crop box is resampled: the same picture within one grey level (1/255)."""
    p = Preprocessing()
    img = _noise(*size)
    got, want = p.normalize(p.resize_crop(img)), p.normalize(_reference_resize_crop(p, img))
    assert got.shape == (3, 224, 224)
    assert np.abs(got - want).max() <= 2 / 255 + 1e-6  # one grey level after the [-1, 1] scaling
    assert np.mean(got != want) < 0.05


_PEAK_CHILD = r"""
import resource, sys
from prodclass.preprocess import Preprocessing
import numpy as np  # noqa: F401

def hwm_kb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))

def vm_kb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize"))

prep = Preprocessing()
x = prep(sys.argv[1] if sys.argv[1] != "-" else __import__("PIL.Image").Image.new("RGB", (224, 224)))
base = hwm_kb()
# never let a regression eat the shared machine: 1 GiB more address space than now, then MemoryError
limit = (vm_kb() + 1024 * 1024) * 1024
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    x = prep(sys.argv[2])
    print(x.shape, hwm_kb() - base)
except MemoryError:
    print("MemoryError", hwm_kb() - base)
"""


@pytest.mark.parametrize("size", [(30000, 1), (1, 30000)])
def test_tiny_elongated_png_has_bounded_memory(tmp_path, size):
    """A 30000×1 (or 1×30000) PNG of a few hundred bytes used to be resized to 6.7 M × 224 pixels
    (4.5 GB); now preprocessing it raises the peak RSS (VmHWM) of a fresh process by < 300 MB."""
    path = tmp_path / "thin.png"
    Image.new("RGB", size, (10, 200, 30)).save(path)
    assert path.stat().st_size < 1000
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, "-", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    result, grew_kb = out.stdout.split()[:-1], int(out.stdout.split()[-1])
    assert " ".join(result) == "(3, 224, 224)", out.stdout
    assert grew_kb < 300 * 1024, f"peak RSS grew by {grew_kb / 1024:.0f} MB"
