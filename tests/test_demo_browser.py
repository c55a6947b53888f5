"""The Gradio demo, driven in headless Debian Chromium by Playwright: upload a real abo-small photo,
see its product type and the review notice; nothing is fetched from outside 127.0.0.1."""

import copy
import shutil
import socket
from pathlib import Path

import pandas as pd
import pytest
from playwright import sync_api  # noqa: E402

from prodclass.io import write_bytes  # noqa: E402
from prodclass.serving.demo import example_images, launch_demo, review_message  # noqa: E402
from prodclass.serving.predictor import Predictor  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
# Running as root on a closed network: no sandbox, no GPU, no background traffic of the browser's own.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_example_images_are_test_split_one_per_class(tiny_run):
    t = pd.read_parquet(tiny_run / "dataset.parquet").set_index("image_path")
    ex = example_images(tiny_run, n=4)
    assert len(ex) == 4 and all(Path(p).is_file() for p in ex)
    assert set(t.loc[ex, "split"]) == {"test"} and t.loc[ex, "label"].nunique() == 4
    assert example_images(tiny_run.parent / "no-such-run") == []


def test_review_message():
    assert review_message(["shoes", "boot"], [0.91, 0.05], False, 0.5) == "### shoes (91%)"
    msg = review_message(["shoes", "boot"], [0.41, 0.35], True, 0.5)
    assert "Not sure — send to review" in msg and "shoes" in msg and "50%" in msg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.system_package("chromium")
def test_demo_in_chromium(tiny_run, tmp_path):
    predictor = copy.copy(Predictor.from_run(tiny_run))  # a copy: this test changes its threshold
    t = pd.read_parquet(tiny_run / "dataset.parquet")
    photos = t.loc[t["split"] == "test", "image_path"].tolist()[:1]
    expected = predictor.predict(photos, top_k=5)[0]
    outside: list[str] = []
    demo = launch_demo(tiny_run, port=_free_port(), block=False, predictor=predictor)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 800})
            try:
                page = browser.new_page()
                page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(demo.local_url) else None)
                page.goto(demo.local_url)
                assert "What product is this?" in page.locator("h1").inner_text(timeout=60_000)

                page.set_input_files("input[type=file]", photos[0])
                verdict = page.locator("#verdict h3")
                sync_api.expect(verdict).to_have_text(f"{expected.labels[0]} ({expected.probs[0]:.0%})", timeout=60_000)
                headline = page.locator(".output-class").first  # the Label's headline: the top class
                sync_api.expect(headline).to_have_text(expected.labels[0])
                for label in expected.labels:  # all five bars are there
                    sync_api.expect(page.get_by_text(label, exact=True).first).to_be_visible()
                png = page.screenshot(full_page=True)

                predictor.threshold = 1.01  # now no probability is high enough: the demo must defer
                page.locator(".gallery-item").nth(1).click()  # an example from the test split
                sync_api.expect(verdict).to_have_text("⚠️ Not sure — send to review", timeout=60_000)
            finally:
                browser.close()
    finally:
        demo.close()
    write_bytes(tmp_path / "demo.png", png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert outside == [], f"the demo fetched from outside: {outside}"
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
