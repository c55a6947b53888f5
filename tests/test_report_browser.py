"""report.html in a real browser: headless Chromium renders it offline, every section is there and
no image is broken (Debian's ``chromium`` package; skipped with a reason when it is absent)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from prodclass.evaluation.report import SECTIONS, write_report

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.shared_data,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")]

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


@pytest.fixture(scope="module")
def report(tiny_run, tmp_path_factory) -> Path:
    """report.html of a copy of the tiny run with a few wrong test predictions (so the gallery shows)."""
    run = shutil.copytree(tiny_run, tmp_path_factory.mktemp("browser") / "run")
    t = pd.read_parquet(run / "predictions_test.parquet")
    for i in range(4):
        t.at[i, "logits"] = np.roll(t.at[i, "logits"], 1)
    t.to_parquet(run / "predictions_test.parquet")
    write_report(run)
    return run / "report.html"


def test_report_renders_with_all_sections_and_no_broken_image(report, tmp_path):
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    out = chromium(probed.as_uri(), tmp_path, "--dump-dom")
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r'<pre id="probe">(.*?)</pre>', out.stdout)
    assert m, "the probe did not run: " + out.stdout[-500:]
    probe = json.loads(m.group(1).replace("&quot;", '"'))
    assert probe["broken"] == []
    # class counts, training curves, confusion matrix, ROC/PR, reliability + one thumbnail per mistake
    assert probe["thumbnails"] >= 3 and probe["images"] == 5 + probe["thumbnails"]
    assert probe["sections"] == ["summary", *SECTIONS]
    assert probe["height"] > 3000


def test_screenshot_shows_the_page(report, tmp_path):
    shot = tmp_path / "shot.png"
    out = chromium(report.as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1280,4000")
    assert out.returncode == 0 and shot.is_file(), out.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 4000)
    assert img.getpixel((640, 20)) == (0x1D, 0x23, 0x30)  # the dark header: the stylesheet was applied
    colours = len(img.resize((320, 1000)).getcolors(1 << 20))
    assert colours > 500  # plots and photos, not a blank or error page
