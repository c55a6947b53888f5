"""Batch prediction: odd files become rows, inputs (folder/glob/catalog), output formats, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from prodclass.serving.batch import expand_inputs, predict_to_file
from prodclass.serving.predictor import Predictor

pytestmark = pytest.mark.shared_data

ODD = {  # file -> does it classify?
    "good.jpg": True, "truncated.jpg": False, "empty.jpg": False, "alpha.png": True,
    "grey.jpg": True, "cmyk.jpg": True, "readme.txt": False,
}


@pytest.fixture(scope="module")
def predictor(tiny_run):
    return Predictor.from_run(tiny_run)


@pytest.fixture(scope="module")
def real_images(tiny_run):
    t = pd.read_parquet(tiny_run / "dataset.parquet")
    return t["image_path"].tolist()


@pytest.fixture(scope="module")
def odd_folder(real_images, tmp_path_factory):
    d = tmp_path_factory.mktemp("odd")
    src = Image.open(real_images[0]).convert("RGB")
    raw = Path(real_images[0]).read_bytes()
    (d / "good.jpg").write_bytes(raw)
    (d / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (d / "empty.jpg").write_bytes(b"")
    rgba = src.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(src.size))
    rgba.save(d / "alpha.png")
    src.convert("L").save(d / "grey.jpg")
    src.convert("CMYK").save(d / "cmyk.jpg")
    (d / "readme.txt").write_text("product photos of the spring catalog\n")
    (d / ".hidden.jpg").write_bytes(raw)  # hidden files are not inputs
    return d


def test_every_odd_file_is_a_row(predictor, odd_folder, tmp_path):
    images = expand_inputs([str(odd_folder)])
    assert sorted(Path(p).name for p in images) == sorted(ODD)
    s = predict_to_file(predictor, images, tmp_path / "p.csv", tmp_path / "review.csv", top_k=3, progress=False)
    t = pd.read_csv(tmp_path / "p.csv")
    assert t["image"].tolist() == images and len(t) == len(ODD)
    for _, row in t.iterrows():
        name = Path(row["image"]).name
        if ODD[name]:
            assert pd.isna(row["error"]) and row["label_1"] in predictor.classes and row["prob_1"] >= row["prob_2"]
        else:
            assert name in row["error"] and pd.isna(row["label_1"])
    assert "empty" in t.set_index(t["image"].map(lambda p: Path(p).name)).loc["empty.jpg", "error"]
    assert (s["n"], s["errors"], s["predicted"]) == (7, 3, 4) and not (tmp_path / "p.csv.parts").exists()
    review = pd.read_csv(tmp_path / "review.csv")
    expected = t[t["error"].notna() | t["abstain"]]
    assert review["image"].tolist() == expected["image"].tolist() and s["review"]["rows"] == len(review)
    assert set(review["reason"]) <= {"error", "low confidence"} and (review["reason"] == "error").sum() == 3


def test_formats_agree(predictor, odd_folder, tmp_path):
    images = expand_inputs([str(odd_folder / "*.jpg")])
    assert sorted(Path(p).name for p in images) == ["cmyk.jpg", "empty.jpg", "good.jpg", "grey.jpg", "truncated.jpg"]
    for suffix in ("csv", "jsonl", "parquet"):
        predict_to_file(predictor, images, tmp_path / f"p.{suffix}", top_k=2, progress=False)
    csv, par = pd.read_csv(tmp_path / "p.csv"), pd.read_parquet(tmp_path / "p.parquet")
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == csv["image"].tolist() == par["image"].tolist() == images
    assert [r["label_1"] for r in rows] == par["label_1"].astype(object).where(par["label_1"].notna(), None).tolist()
    assert list(par.columns) == ["image", "label_1", "prob_1", "label_2", "prob_2", "abstain", "error"]
    with pytest.raises(ValueError, match="unsupported output format"):
        predict_to_file(predictor, images, tmp_path / "p.xlsx", progress=False)


def test_catalog_csv_input(real_images, tmp_path):
    names = [Path(p).name for p in real_images[:3]] + ["gone.jpg"]
    pd.DataFrame({"sku": list("abcd"), "photo": names}).to_csv(tmp_path / "catalog.csv", index=False)
    image_dir = Path(real_images[0]).parent
    images = expand_inputs([str(tmp_path / "catalog.csv")], image_column="photo", image_dir=image_dir)
    assert images == [str(image_dir / n) for n in names]
    with pytest.raises(ValueError, match=r"catalog.csv: no image column .*'sku', 'photo'"):
        expand_inputs([str(tmp_path / "catalog.csv")])
    with pytest.raises(ValueError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.png")])


class _Counting:
    """A backend wrapper that counts images and can stop the job like Ctrl-C after ``stop_after``."""

    def __init__(self, backend, stop_after=None):
        self.backend, self.stop_after, self.seen = backend, stop_after, 0

    def __call__(self, x):
        if self.stop_after is not None and self.seen >= self.stop_after:
            raise KeyboardInterrupt
        self.seen += len(x)
        return self.backend(x)


def test_interrupted_job_resumes_without_duplicates(predictor, real_images, tmp_path):
    images = real_images[:12]
    ref = predict_to_file(predictor, images, tmp_path / "ref.csv", progress=False, top_k=2)
    flaky = Predictor(_Counting(predictor.backend, stop_after=4), predictor.classes, predictor.preprocessing,
                      predictor.temperature, predictor.threshold, predictor.meta)
    with pytest.raises(KeyboardInterrupt):
        predict_to_file(flaky, images, tmp_path / "p.csv", top_k=2, batch_size=4, chunk_size=4, progress=False)
    parts = tmp_path / "p.csv.parts"
    assert not (tmp_path / "p.csv").exists() and sorted(f.name for f in parts.glob("chunk-*")) == ["chunk-000000.parquet"]
    counting = _Counting(predictor.backend)
    resumed = Predictor(counting, predictor.classes, predictor.preprocessing, predictor.temperature,
                        predictor.threshold, predictor.meta)
    msgs = []
    s = predict_to_file(resumed, images, tmp_path / "p.csv", top_k=2, batch_size=4, chunk_size=4, progress=False,
                        echo=msgs.append)
    assert s["resumed"] == 4 and counting.seen == 8 and any("resuming: 4 of 12" in m for m in msgs)
    t, r = pd.read_csv(tmp_path / "p.csv"), pd.read_csv(tmp_path / "ref.csv")
    assert t["image"].tolist() == images and ref["n"] == 12
    assert t["label_1"].tolist() == r["label_1"].tolist()
    np.testing.assert_allclose(t["prob_1"], r["prob_1"], atol=1e-5)
    # parts left by another job (different inputs) are discarded, not mixed in
    with pytest.raises(KeyboardInterrupt):
        predict_to_file(flaky, images[:8], tmp_path / "q.csv", top_k=2, batch_size=4, chunk_size=4, progress=False)
    msgs = []
    predict_to_file(predictor, images[8:], tmp_path / "q.csv", top_k=2, chunk_size=4, progress=False, echo=msgs.append)
    assert pd.read_csv(tmp_path / "q.csv")["image"].tolist() == images[8:] and "starting over" in msgs[0]


def test_killed_cli_job_resumes(tiny_run, real_images, tmp_path):
    images = real_images[:24]
    pd.DataFrame({"image_path": images}).to_csv(tmp_path / "catalog.csv", index=False)
    out = tmp_path / "pred.jsonl"
    cmd = [sys.executable, "-m", "prodclass.cli", "predict", str(tiny_run), str(tmp_path / "catalog.csv"),
           "--out", str(out), "--review-out", str(tmp_path / "review.csv"), "--chunk-size", "4", "--batch-size", "4",
           "--quiet", "--backend", "torch"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts, deadline = Path(str(out) + ".parts"), time.time() + 300
    while not list(parts.glob("chunk-*.parquet")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # like an OOM kill or a lost node: no cleanup runs
    proc.wait()
    done = len(list(parts.glob("chunk-*.parquet")))
    assert not out.exists() and 1 <= done < 6
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"resuming: {4 * done} of 24" in res.stderr and "24 images: 24 predicted" in res.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in rows] == images and not parts.exists()
    assert all(r["label_1"] in json.loads((tiny_run / "class_map.json").read_text())["classes"] for r in rows)
    assert (tmp_path / "review.csv").is_file()
