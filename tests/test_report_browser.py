"""The report page in a real browser: headless Chromium renders it offline, every section is there and
no image is broken (Debian's ``chromium`` package; skipped with a reason when it is absent).

One page from hand-made inputs (no backbone, no shared data) and one from a real tiny run."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from prodclass.evaluation.report import SECTIONS, inputs_from_run, render_report
from prodclass.runs import RunDir
from test_report import make_inputs

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.system_package("chromium")

# Runs after the load event: lists every <img> that did not decode, and the sections laid out.
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const out = {images: imgs.length, thumbnails: document.querySelectorAll('.tile img').length,
               broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
               sections: [...document.querySelectorAll('section')].filter(s => s.offsetHeight > 0).map(s => s.id),
               height: document.body.scrollHeight};
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});</script>"""


def chromium(url: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'profile'}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def probe(page: Path, tmp: Path) -> dict:
    """What the browser made of ``page``: image counts, broken images, visible sections, height."""
    probed = tmp / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    out = chromium(probed.as_uri(), tmp, "--dump-dom")
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r'<pre id="probe">(.*?)</pre>', out.stdout)
    assert m, "the probe did not run: " + out.stdout[-500:]
    return json.loads(m.group(1).replace("&quot;", '"'))


def assert_screenshot_shows_the_page(page: Path, tmp: Path) -> None:
    shot = tmp / "shot.png"
    out = chromium(page.as_uri(), tmp, f"--screenshot={shot}", "--window-size=1280,4000")
    assert out.returncode == 0 and shot.is_file(), out.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 4000)
    assert img.getpixel((640, 20)) == (0x1D, 0x23, 0x30)  # the dark header: the stylesheet was applied
    colours = len(img.resize((320, 1000)).getcolors(1 << 20))
    assert colours > 500  # plots and photos, not a blank or error page


@pytest.fixture(scope="module")
def handmade(tmp_path_factory) -> Path:
    """A page rendered from hand-made inputs (real JPEG thumbnails, some missing images)."""
    tmp = tmp_path_factory.mktemp("handmade")
    page = tmp / "page.html"
    page.write_text(render_report(make_inputs(tmp), max_gallery=12), encoding="utf-8")
    return page


@pytest.fixture(scope="module")
def report(tiny_run, tmp_path_factory) -> Path:
    """The report of a copy of the tiny run with a few wrong test predictions (so the gallery shows)."""
    run = RunDir(shutil.copytree(tiny_run, tmp_path_factory.mktemp("browser") / "run"))
    t = pd.read_parquet(run.predictions_file("test"))
    for i in range(4):
        t.at[i, "logits"] = np.roll(t.at[i, "logits"], 1)
    t.to_parquet(run.predictions_file("test"))
    run.write_report(render_report(inputs_from_run(run)))
    return run.report_file


def test_handmade_report_renders_with_all_sections_and_no_broken_image(handmade, tmp_path):
    p = probe(handmade, tmp_path)
    assert p["broken"] == []
    # class counts, training curves, confusion matrix, ROC/PR, reliability + one thumbnail per readable mistake
    assert p["thumbnails"] >= 3 and p["images"] == 5 + p["thumbnails"]
    assert p["sections"] == ["summary", *SECTIONS]
    assert p["height"] > 3000
    assert_screenshot_shows_the_page(handmade, tmp_path)


@pytest.mark.shared_data
def test_report_renders_with_all_sections_and_no_broken_image(report, tmp_path):
    p = probe(report, tmp_path)
    assert p["broken"] == []
    assert p["thumbnails"] >= 3 and p["images"] == 5 + p["thumbnails"]
    assert p["sections"] == ["summary", *SECTIONS]
    assert p["height"] > 3000


@pytest.mark.shared_data
def test_screenshot_shows_the_page(report, tmp_path):
    assert_screenshot_shows_the_page(report, tmp_path)
