"""Issue 16: the command line as a careless user meets it — one-line errors naming the file (a
traceback only with --debug), exit codes that tell whether anything was classified, and commands
that take a run directory refusing anything else."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from prodclass.cli import app

pytestmark = pytest.mark.shared_data


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(r, *names, code=2):
    """Exit ``code``, stderr is one ``error: ...`` line naming each of ``names``, no traceback."""
    assert r.exit_code == code, r.output
    err = r.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in r.output, r.output
    for name in names:
        assert str(name) in err, err
    return err


@pytest.fixture(scope="module")
def image(tiny_run):
    return pd.read_parquet(tiny_run / "dataset.parquet")["image_path"].iloc[0]


def test_exit_status_and_counts(tiny_run, image, tmp_path):
    """Finding 8: exit 0 when every input failed; the counts were printed only with --out."""
    missing = tmp_path / "missing.jpg"
    r = invoke("predict", tiny_run, missing)
    assert r.exit_code == 1 and "1 images: 0 predicted, 0 abstain, 1 errors" in r.stdout
    assert r.stderr.strip() == "error: no input could be classified"
    r = invoke("predict", tiny_run, image, missing)
    assert r.exit_code == 0 and "2 images: 1 predicted, 0 abstain, 1 errors" in r.stdout and not r.stderr
    r = invoke("predict", tiny_run, image, missing, "--strict")
    assert r.exit_code == 1 and r.stderr.strip() == "error: --strict: 1 of 2 inputs failed"
    r = invoke("predict", tiny_run, image, missing, "--json")  # stdout is pure JSON lines, the counts go to stderr
    assert r.exit_code == 0 and [json.loads(line)["image"] for line in r.stdout.splitlines()] == [image, str(missing)]
    assert r.stderr.strip() == "2 images: 1 predicted, 0 abstain, 1 errors"
    r = invoke("predict", tiny_run, missing, "--out", tmp_path / "p.csv", "--quiet")
    assert r.exit_code == 1 and "1 images: 0 predicted, 0 abstain, 1 errors" in r.stdout
    assert pd.read_csv(tmp_path / "p.csv")["error"].str.contains("does not exist").all()
    assert "Exit status: 0 = at least one input classified" in " ".join(invoke("predict", "--help").stdout.split())


def test_empty_argument_is_an_error_row(tiny_run, image, tmp_path, monkeypatch):
    """Finding 5: `prodclass predict RUN ""` classified the current folder recursively."""
    shutil.copy(image, tmp_path / "here.jpg")
    monkeypatch.chdir(tmp_path)
    r = invoke("predict", tiny_run, "", "--json")
    assert r.exit_code == 1 and [json.loads(line)["error"] for line in r.stdout.splitlines()] == [
        "'': empty argument (it names no file or folder)"]


def test_commands_take_a_run_directory(tiny_run, tmp_path):
    """Finding 4: a file of the run instead of the run directory; the message names the directory."""
    weights = tiny_run / "model.safetensors"
    for command in ("predict", "export", "report", "demo"):
        r = invoke(command, weights, *(["x.jpg"] if command == "predict" else []))
        err = assert_one_line_error(r, weights, f"`prodclass {command}` takes a run directory")
        assert f"this file's run directory is {tiny_run}" in err
    assert_one_line_error(invoke("predict", tmp_path / "nope", "x.jpg"), tmp_path / "nope", "not a run directory")


def test_predict_takes_an_onnx_export_with_its_sidecar(tiny_run, image, tmp_path):
    """Finding 4: the documented export file is accepted, with the sidecar's temperature and threshold."""
    from prodclass.serving.export import export_onnx

    run = shutil.copytree(tiny_run, tmp_path / "run")
    export_onnx(run, parity_images=2)
    via_run = invoke("predict", run, image, "--json", "--backend", "onnx")
    via_file = invoke("predict", run / "model.onnx", image, "--json")
    assert via_file.exit_code == 0, via_file.output
    assert json.loads(via_file.stdout) == json.loads(via_run.stdout)
    assert_one_line_error(invoke("predict", run / "model.onnx", image, "--backend", "torch"),
                          run / "model.onnx", "--backend torch needs a run directory")
    shutil.copy(run / "model.onnx", tmp_path / "alone.onnx")
    assert_one_line_error(invoke("predict", tmp_path / "alone.onnx", image), tmp_path / "alone.onnx.json", "missing")
    (tmp_path / "alone.onnx.json").write_text("{not json")
    assert_one_line_error(invoke("predict", tmp_path / "alone.onnx", image), tmp_path / "alone.onnx.json",
                          "unreadable JSON")


def test_output_and_model_errors_are_one_line(tiny_run, image, tmp_path):
    """Finding 6: tracebacks for --out naming a folder or a path under a file, and a damaged model."""
    (tmp_path / "dir.csv").mkdir()
    assert_one_line_error(invoke("predict", tiny_run, image, "--out", tmp_path / "dir.csv"), tmp_path / "dir.csv",
                          "is a folder")
    (tmp_path / "file").write_text("x")
    assert_one_line_error(invoke("predict", tiny_run, image, "--out", tmp_path / "file" / "p.csv"),
                          tmp_path / "file", "is not a folder")
    run = shutil.copytree(tiny_run, tmp_path / "run")
    (run / "model.safetensors").write_bytes(b"\x00" * 64)
    assert_one_line_error(invoke("predict", run, image, "--backend", "torch"), run / "model.safetensors")
    (run / "model.onnx").write_bytes(b"not an onnx model")  # --backend auto picks an existing export
    assert_one_line_error(invoke("predict", run, image), run / "model.onnx")
    # --debug (before the command) raises the error itself, with its traceback
    r = invoke("--debug", "predict", tiny_run, image, "--out", tmp_path / "dir.csv")
    assert isinstance(r.exception, ValueError) and "is a folder" in str(r.exception)


def test_unreadable_catalog_is_one_line(tiny_run, tmp_path, monkeypatch):
    """Finding 6: a catalog the user may not read (the tests run as root: the refusal is simulated)."""
    catalog = tmp_path / "c.csv"
    catalog.write_text("image_path\nx.jpg\n")
    real = Path.read_bytes

    def refuse(self):
        if self == catalog:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert_one_line_error(invoke("predict", tiny_run, catalog), catalog, "Permission denied")


def test_messages_name_the_file(tiny_run, image, tmp_path):
    """Finding 7: a non-UTF-8 or empty CSV, empty path cells, malformed run JSON, two jobs on one --out."""
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"image_path,name\n" + image.encode() + b",caf\xe9\n")
    r = invoke("predict", tiny_run, latin, "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["error"] == (
        f"{latin}: line 2, column 'name': not valid UTF-8 (byte 0xe9); save the file as UTF-8")
    (tmp_path / "empty.csv").write_bytes(b"")
    assert_one_line_error(invoke("predict", tiny_run, tmp_path / "empty.csv"), tmp_path / "empty.csv", "empty file")
    cells = tmp_path / "cells.csv"
    cells.write_text(f"image_path,sku\n{image},a\n,b\n  ,c\n")
    r = invoke("predict", tiny_run, cells, "--json")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.exit_code == 0 and [row["error"] for row in rows] == [
        None, f"{cells}: line 3, column 'image_path': empty image path",
        f"{cells}: line 4, column 'image_path': empty image path"]
    run = shutil.copytree(tiny_run, tmp_path / "run")
    for name in ("calibration.json", "abstention.json"):
        shutil.copy(tiny_run / name, run / name)
        (run / name).write_text('{"temperature": ')
        assert_one_line_error(invoke("predict", run, image), run / name, "unreadable JSON")
        shutil.copy(tiny_run / name, run / name)
    from prodclass.io import exclusive_lock

    with exclusive_lock(tmp_path / "p.csv.lock"):
        assert_one_line_error(invoke("predict", tiny_run, image, "--out", tmp_path / "p.csv"),
                              tmp_path / "p.csv", "another job is writing this file now", tmp_path / "p.csv.lock")
