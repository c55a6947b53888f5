"""The run directory: one owner of file names, a model format that never runs code, and a run's
test metrics equal to what its Predictor (the served path) gives on the same images."""

import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from prodclass.inference import softmax
from prodclass.models.serialization import load_classifier
from prodclass.runs import RunDir, RunDirError

SRC = Path(__file__).resolve().parents[1] / "src" / "prodclass"
CLI = [sys.executable, "-m", "prodclass.cli"]


class _Payload:
    """Unpickling this creates a directory: proof that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.makedirs, (str(self.marker),)


def _malicious(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state_dict": _Payload(marker), "format_version": 1}))


def _one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    err = out.stderr.strip()
    assert out.returncode == 2, (out.returncode, out.stdout[-500:], err[-2000:])
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_no_run_file_name_outside_runs_py_and_no_code_executing_loader():
    hits = []
    for f in SRC.rglob("*.py"):
        text = f.read_text(encoding="utf-8")
        if f.name != "runs.py" and re.search(r'"metrics\.json"|"model\.pt"|predictions_', text):
            hits.append(str(f))
        if re.search(r"weights_only=False|pickle", text):
            hits.append(f"{f}: code-executing loader")
    assert not hits


def test_rundir_round_trips_a_model_and_refuses_foreign_weights(tmp_path):
    run = RunDir(tmp_path)
    run.write_model({"w": torch.arange(6.0).reshape(2, 3).t()}, {"backbone": "x", "classes": ["a"]})  # non-contiguous
    state, meta = run.read_model()
    assert torch.equal(state["w"], torch.arange(6.0).reshape(2, 3).t()) and meta["format_version"] == 2
    run.weights_file.write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(RunDirError, match="model.safetensors: not a safetensors weights file"):
        run.read_model()
    run.model_meta_file.write_text(json.dumps({"format": "prodclass-model", "format_version": 99}))
    with pytest.raises(RunDirError, match="version 99"):
        run.check_model()


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def _image(tiny_run) -> str:
    return RunDir(tiny_run).read_predictions("test")[0]["image_path"].iloc[0]


@pytest.mark.shared_data
def test_predict_and_serve_refuse_a_malicious_weights_file(run_copy, tiny_run, tmp_path):
    marker = tmp_path / "pwned"
    _malicious(run_copy / "model.safetensors", marker)
    out = subprocess.run(CLI + ["predict", str(run_copy), _image(tiny_run)], capture_output=True, text=True, timeout=300)
    _one_line_error(out, "model.safetensors", "not a safetensors weights file")
    out = subprocess.run(CLI + ["serve", str(run_copy), "--port", "0"], capture_output=True, text=True, timeout=300)
    _one_line_error(out, "model.safetensors")
    assert not marker.exists()


@pytest.mark.shared_data
def test_an_old_model_pt_is_refused_with_the_migration_command_and_migrate_runs_no_code(run_copy, tiny_run, tmp_path):
    marker = tmp_path / "pwned"
    (run_copy / "model.safetensors").unlink()
    (run_copy / "model.json").unlink()
    _malicious(run_copy / "model.pt", marker)
    out = subprocess.run(CLI + ["predict", str(run_copy), _image(tiny_run)], capture_output=True, text=True, timeout=300)
    _one_line_error(out, "model.pt", f"prodclass migrate {run_copy}")
    out = subprocess.run(CLI + ["migrate", str(run_copy)], capture_output=True, text=True, timeout=300)
    _one_line_error(out, "model.pt", "refused")
    assert not marker.exists() and not (run_copy / "model.safetensors").exists()


@pytest.mark.shared_data
def test_migrate_converts_a_genuine_format_1_model(run_copy, tiny_run):
    model, meta = load_classifier(tiny_run)
    (run_copy / "model.safetensors").unlink()
    (run_copy / "model.json").unlink()
    old = {"format_version": 1, "backbone": meta["backbone"], "head": meta["head"], "classes": meta["classes"],
           "preprocessing": meta["preprocessing"], "state_dict": model.state_dict(), "epoch": 3, "stage": "head"}
    torch.save(old, run_copy / "model.pt")
    out = subprocess.run(CLI + ["migrate", str(run_copy)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert not (run_copy / "model.pt").exists()
    again, meta2 = load_classifier(run_copy)
    assert meta2["classes"] == meta["classes"] and meta2["epoch"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


@pytest.mark.shared_data
def test_resume_refuses_a_malicious_checkpoint_before_training(run_copy, tmp_path):
    marker = tmp_path / "pwned"
    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    cfg["finetune"]["enabled"] = True
    (run_copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    _malicious(run_copy / "finetune_last.pt", marker)
    out = subprocess.run(CLI + ["run", "--resume", str(run_copy), "--quiet"], capture_output=True, text=True, timeout=600)
    _one_line_error(out, "finetune_last.pt", "refused")
    assert not marker.exists()


@pytest.mark.shared_data
def test_run_metrics_equal_the_predictor_over_the_test_split(tiny_run):
    from prodclass.serving.predictor import Predictor

    run = RunDir(tiny_run)
    table, stored = run.read_predictions("test")
    metrics, classes = run.read_metrics(), run.read_classes()
    predictor = Predictor.from_run(tiny_run)
    logits, errors = predictor.logits(table["image_path"].tolist())
    assert errors == [None] * len(table)
    assert (logits.argmax(1) == stored.argmax(1)).all()  # identical top-1 for every image
    t = predictor.temperature
    assert np.abs(softmax(logits, t) - softmax(stored, t)).max() < 1e-4
    y = table["y_true"].to_numpy()
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(1) == y).mean()), abs=1e-12)
    dataset = pd.read_parquet(run.dataset_file)
    test = dataset[dataset["split"] == "test"]
    assert test["image_path"].tolist() == table["image_path"].tolist()
    assert [classes[i] for i in y] == test["label"].tolist()
