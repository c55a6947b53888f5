"""End-to-end: the main job on a small real abo-small subset, and its run directory contract."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import make_tiny_catalog, tiny_config

pytestmark = pytest.mark.shared_data

RUN_FILES = ["config.yaml", "versions.json", "dataset.parquet", "class_map.json", "class_counts.csv",
             "class_counts.png", "model.safetensors", "model.json", "history.json", "metrics.json", "per_class.csv",
             "confusion_matrix.png", "predictions_val.parquet", "predictions_test.parquet", "calibration.json",
             "abstention.json", "report.html"]


def test_run_directory_is_complete(tiny_run):
    missing = [f for f in RUN_FILES if not (tiny_run / f).is_file()]
    assert not missing
    assert not (tiny_run / "model.pt").exists() and not (tiny_run / "head_best.pt").exists()
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert m["num_classes"] == 5 and m["n"] == len(pd.read_parquet(tiny_run / "predictions_test.parquet"))
    # 5 visually distinct product types: frozen ImageNet features separate them well
    assert m["accuracy"] >= 0.8
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert cfg["model"]["backbone"] == "efficientnet_lite0" and cfg["train"]["epochs"] == 30
    versions = json.loads((tiny_run / "versions.json").read_text())
    assert versions["torch"].startswith("2.13.0")


def test_stored_split_has_no_item_in_two_splits(tiny_run):
    t = pd.read_parquet(tiny_run / "dataset.parquet")
    assert t.groupby("item_id")["split"].nunique().max() == 1
    assert set(t["split"]) == {"train", "val", "test"}


def test_second_run_reuses_embedding_cache(tiny_run, tmp_path, data_root):
    from prodclass.config import validate_config
    from prodclass.pipeline import run

    cfg_map = yaml.safe_load((tiny_run / "config.yaml").read_text())
    msgs = []
    res = run(validate_config(cfg_map), data_root, run_dir=tmp_path / "again", progress=False, echo=msgs.append)
    emb = res.metrics["embedding"]
    assert emb["computed"] == 0 and emb["cached"] == emb["images"] > 0
    assert any("reused" in m for m in msgs)


def test_cli_run_and_predict(tmp_path, data_root):
    csv = make_tiny_catalog(data_root, tmp_path / "cat", per_class=8)
    cfg = tiny_config(data_root, csv, tmp_path / "cache")
    cfg["output_dir"] = str(tmp_path / "runs")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    exe = [sys.executable, "-m", "prodclass.cli"]
    out = subprocess.run(exe + ["run", str(tmp_path / "c.yaml"), "--quiet"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "test accuracy" in out.stdout and "macro-F1" in out.stdout
    run_dir = out.stdout.strip().splitlines()[-1].split("run directory: ")[1]
    img = pd.read_csv(csv)["image_name"].iloc[0]
    pred = subprocess.run(exe + ["predict", run_dir, str(data_root / "abo-small/images" / img), "--json", "-k", "3"],
                          capture_output=True, text=True, timeout=300)
    assert pred.returncode == 0, pred.stderr
    row = json.loads(pred.stdout.strip().splitlines()[-1])
    assert len(row["labels"]) == 3 and abs(sum(row["probs"]) - 1) < 1 and row["probs"] == sorted(row["probs"], reverse=True)


def test_cli_reports_bad_column_in_one_line(tmp_path, data_root):
    csv = make_tiny_catalog(data_root, tmp_path / "cat", per_class=4)
    cfg = tiny_config(data_root, csv, tmp_path / "cache")
    cfg["data"]["columns"]["item_name"] = "title"  # abo-small has `name`, not `title`
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "prodclass.cli", "run", str(tmp_path / "c.yaml"), "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    err = out.stderr.strip()
    assert err.count("\n") == 0 and "'title'" in err and "catalog.csv" in err


def test_resume_of_a_finished_run_is_refused(tiny_run, tmp_path, data_root, monkeypatch):
    """Issue 16, finding 11: `run --resume` on a finished run retrained it and replaced its model
    (the served model changed); now it is refused in one line unless --force."""
    import shutil

    from typer.testing import CliRunner

    import prodclass.pipeline as pipeline
    from prodclass.cli import app
    from prodclass.config import validate_config
    from prodclass.runs import RunDirError

    run = shutil.copytree(tiny_run, tmp_path / "run")
    weights = (run / "model.safetensors").read_bytes()
    cli = ["run", "--resume", str(run), "--data-root", str(data_root), "--quiet"]
    r = CliRunner().invoke(app, cli)
    err = r.stderr.strip()
    assert r.exit_code == 2 and "\n" not in err and "Traceback" not in r.output, r.output
    assert f"{run / 'metrics.json'}: the run in {run} is finished" in err and "--force" in err
    assert (run / "model.safetensors").read_bytes() == weights
    cfg = validate_config(yaml.safe_load((run / "config.yaml").read_text()))
    with pytest.raises(RunDirError, match="is finished"):
        pipeline.run(cfg, data_root, run_dir=run, resume=True, progress=False, echo=lambda *_: None)

    def first_stage(*_args):
        raise RuntimeError("first stage reached")

    monkeypatch.setattr(pipeline, "_curated", first_stage)  # --force passes the check; stop before training
    r = CliRunner().invoke(app, [*cli, "--force"])
    assert r.exit_code == 2 and r.stderr.strip() == "error: first stage reached"
    r = CliRunner().invoke(app, ["run", str(run / "config.yaml"), "--force"])
    assert r.exit_code == 2 and r.stderr.strip() == "error: --force goes with --resume RUN_DIR"
