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


# ---------------------------------------------------------------- issue 16: every input is one row


def _rel(images, root):
    return [Path(i).relative_to(root).as_posix() for i in images]


def test_links_loops_and_special_files_each_give_one_row(predictor, real_images, tmp_path):
    """Finding 2: a dangling link, a link loop, a FIFO and a link back into the folder used to be
    dropped silently; now each is an error row with its reason, and linked folders are followed."""
    raw = Path(real_images[0]).read_bytes()
    d, other = tmp_path / "in", tmp_path / "elsewhere"
    (d / "sub").mkdir(parents=True)
    other.mkdir()
    (d / "a.jpg").write_bytes(raw)
    (other / "b.jpg").write_bytes(raw)
    (d / "linked").symlink_to(other, target_is_directory=True)  # a symlinked subfolder: followed
    (d / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (d / "loop1.jpg").symlink_to(d / "loop2.jpg")
    (d / "loop2.jpg").symlink_to(d / "loop1.jpg")
    (d / "sub" / "up").symlink_to(d, target_is_directory=True)  # leads back into d: not followed
    (d / "sub" / "c.jpg").symlink_to(d / "a.jpg")  # a link to a file is that file
    os.mkfifo(d / "pipe.jpg")  # opening it would block forever
    (d / "empty").mkdir()  # an empty subfolder holds no file: nothing to list
    images = expand_inputs([str(d)])
    assert _rel(images, d) == ["a.jpg", "dangling.jpg", "linked/b.jpg", "loop1.jpg", "loop2.jpg", "pipe.jpg",
                               "sub/c.jpg", "sub/up"]
    s = predict_to_file(predictor, images, tmp_path / "p.csv", top_k=2, progress=False)
    t = pd.read_csv(tmp_path / "p.csv")
    assert t["image"].tolist() == images and (s["n"], s["predicted"], s["errors"]) == (8, 3, 5)
    errors = dict(zip(_rel(t["image"], d), t["error"], strict=True))
    assert f"dangling.jpg: broken symbolic link (its target {tmp_path / 'gone.jpg'} does not exist)" in errors["dangling.jpg"]
    assert "loop1.jpg: symbolic link loop" in errors["loop1.jpg"] and "symbolic link loop" in errors["loop2.jpg"]
    assert "pipe.jpg: not a regular file (a FIFO)" in errors["pipe.jpg"]
    assert f"sub/up: symbolic link loop (leads back to {d.resolve()}" in errors["sub/up"]
    assert all(pd.isna(errors[k]) for k in ("a.jpg", "linked/b.jpg", "sub/c.jpg"))
    # named directly, or matched by a pattern, the same files give the same rows
    direct = expand_inputs([str(d / "dangling.jpg"), str(d / "loop1.jpg"), str(d / "pipe.jpg"), str(d / "*.jpg")])
    assert [getattr(i, "reason", None) is not None for i in direct] == [True, True, True, False, True, True, True, True]
    # an empty folder is one error row, not nothing
    only = expand_inputs([str(d / "empty")])
    assert len(only) == 1 and "empty: folder holds no file" in only[0].reason


def test_empty_argument_is_an_error_row_not_the_current_folder(monkeypatch, real_images, tmp_path):
    """Finding 5: ``prodclass predict RUN ""`` classified the current folder recursively."""
    (tmp_path / "x.jpg").write_bytes(Path(real_images[0]).read_bytes())
    monkeypatch.chdir(tmp_path)
    images = expand_inputs(["", "  "])
    assert images == ["", "  "] and all("empty argument" in i.reason for i in images)


def test_catalog_rows_are_parsed_strictly(real_images, tmp_path):
    """Finding 3: ragged rows, empty paths and bytes that are not UTF-8 are error rows naming the
    catalog, the line (as an editor numbers it) and the column; the other rows are unaffected."""
    image_dir = Path(real_images[0]).parent
    a, b = Path(real_images[0]).name, Path(real_images[1]).name
    c = tmp_path / "c.csv"
    c.write_bytes((
        "image_path,name\n"  # line 1
        f'{a},"two\nlines"\n'  # lines 2-3: one record
        f"{b},x,extra\n"  # line 4: one field too many
        f"{b}\n"  # line 5: one too few
        ",no path\n"  # line 6: empty path
        "\n"  # line 7: blank, no row
    ).encode() + b"caf\xe9.jpg,latin-1\n" + f"{b},fine\n".encode())  # line 8: not UTF-8; line 9
    images = expand_inputs([str(c)], image_dir=image_dir)
    assert images == [str(image_dir / a), f"{c} line 4", f"{c} line 5", f"{c} line 6", f"{c} line 8", str(image_dir / b)]
    reasons = [getattr(i, "reason", None) for i in images]
    assert reasons[1] == f"{c}: line 4: 3 fields but the header has 2 columns (field 3 has no column; a separator too many?)"
    assert reasons[2] == f"{c}: line 5, column 'name': missing; 1 fields but the header has 2 columns"
    assert reasons[3] == f"{c}: line 6, column 'image_path': empty image path"
    assert reasons[4] == f"{c}: line 8, column 'image_path': not valid UTF-8 (byte 0xe9); save the file as UTF-8"


def test_a_long_first_row_keeps_its_image_path(real_images, tmp_path):
    """Finding 3, as the review met it: pandas made the first field of a long first row the index,
    so the path column got the next field and the row pointed at another file."""
    name = Path(real_images[0]).name
    (tmp_path / "c.csv").write_text(f"image_path,label\n{name},shoes,extra\n{name},shoes\n")
    images = expand_inputs([str(tmp_path / "c.csv")], image_dir=Path(real_images[0]).parent)
    assert "line 2: 3 fields but the header has 2 columns" in images[0].reason
    assert images[1] == real_images[0]


def test_catalog_file_errors_name_the_file(tmp_path):
    """Finding 7: an empty CSV, a header that is not UTF-8, a catalog without rows."""
    from prodclass.catalog import CatalogError

    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(CatalogError, match=r"empty\.csv: empty file \(no header row\)"):
        expand_inputs([str(tmp_path / "empty.csv")])
    (tmp_path / "latin.csv").write_bytes(b"image_path,d\xe9signation\nx.jpg,y\n")
    with pytest.raises(CatalogError, match=r"latin\.csv: line 1: the header is not valid UTF-8 \(byte 0xe9\)"):
        expand_inputs([str(tmp_path / "latin.csv")])
    (tmp_path / "header.csv").write_text("image_path,label\n")
    (row,) = expand_inputs([str(tmp_path / "header.csv")])
    assert row.reason == f"{tmp_path / 'header.csv'}: catalog has no data rows"
    pd.DataFrame({"image_path": ["", None]}).to_parquet(tmp_path / "c.parquet")
    assert [i.reason for i in expand_inputs([str(tmp_path / "c.parquet")])] == [
        f"{tmp_path / 'c.parquet'}: row {i}, column 'image_path': empty image path" for i in (0, 1)]


def test_output_paths_are_checked_first_and_one_job_writes_a_file(predictor, real_images, tmp_path):
    """Findings 6 and 7: --out naming a folder or a path under a file failed with a traceback after
    all the work; two jobs writing the same --out mixed their parts."""
    images = real_images[:2]
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(ValueError, match=r"d\.csv: is a folder; give a file name"):
        predict_to_file(predictor, images, tmp_path / "d.csv", progress=False)
    (tmp_path / "f").write_text("a file")
    with pytest.raises(ValueError, match=r"f/p\.csv: cannot be created: .*/f is not a folder"):
        predict_to_file(predictor, images, tmp_path / "f" / "p.csv", progress=False)
    with pytest.raises(ValueError, match="the review file is the output file itself"):
        predict_to_file(predictor, images, tmp_path / "p.csv", tmp_path / "p.csv", progress=False)
    from prodclass.io import LockedError, exclusive_lock

    with exclusive_lock(tmp_path / "p.csv.lock"):
        with pytest.raises(LockedError, match=r"p\.csv: another job is writing this file now .*p\.csv\.lock"):
            predict_to_file(predictor, images, tmp_path / "p.csv", progress=False)
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "p.csv.parts").exists()
    assert predict_to_file(predictor, images, tmp_path / "p.csv", progress=False)["predicted"] == 2
    assert not (tmp_path / "p.csv.lock").exists()


def test_file_names_that_are_not_utf8_are_written(predictor, real_images, tmp_path):
    """A file name holding bytes that are not UTF-8 is shown with \\x escapes, in every format."""
    d = tmp_path / "in"
    d.mkdir()
    (d / os.fsdecode(b"caf\xe9.jpg")).write_bytes(Path(real_images[0]).read_bytes())
    images = expand_inputs([str(d)])
    for suffix in ("csv", "jsonl", "parquet"):
        s = predict_to_file(predictor, images, tmp_path / f"p.{suffix}", progress=False)
        assert s["predicted"] == 1
    assert pd.read_csv(tmp_path / "p.csv")["image"].tolist() == [f"{d}/caf\\xe9.jpg"]
