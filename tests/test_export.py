"""ONNX export: parity with torch on real images, dynamic batch, the sidecar alone is enough, the CLI."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from prodclass.cli import app
from prodclass.serving.predictor import Predictor

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """A copy of the tiny run with ``model.onnx`` exported by the CLI, and the CLI's output."""
    run = shutil.copytree(tiny_run, tmp_path_factory.mktemp("export") / "run")
    res = CliRunner().invoke(app, ["export", str(run)])
    assert res.exit_code == 0, res.output
    return run, res.output


def _real_images(run, split="test"):
    t = pd.read_parquet(run / "dataset.parquet")
    return t[t["split"] == split]["image_path"].tolist()


def test_parity_with_torch_on_real_images(exported):
    run, output = exported
    assert "top-1 agreement 1.000" in output
    paths = _real_images(run) + _real_images(run, "val")
    ref, onnx = Predictor.from_run(run, backend="torch"), Predictor.from_run(run, backend="onnx")
    assert onnx.meta["backend"] == "onnx" and onnx.model is None
    x = np.stack([ref.preprocessing(p) for p in paths])
    p_torch, p_onnx = ref.predict_proba(x), onnx.predict_proba(x)
    assert np.abs(p_torch - p_onnx).max() < 1e-4
    assert (p_torch.argmax(1) == p_onnx.argmax(1)).all()
    # dynamic batch: one image and an odd batch give the same rows
    np.testing.assert_allclose(onnx.predict_proba(x[:1]), p_onnx[:1], atol=1e-5)
    np.testing.assert_allclose(onnx.predict_proba(x[1:6]), p_onnx[1:6], atol=1e-5)
    whole = onnx.backend.session.run(None, {"images": x})[0]  # the graph itself, all images in one call
    np.testing.assert_allclose(whole, onnx.predict_logits(x), atol=1e-4)
    assert [p.labels for p in ref.predict(paths, top_k=3)] == [p.labels for p in onnx.predict(paths, top_k=3)]


def test_sidecar_and_onnx_file_alone_are_enough(exported, tmp_path):
    run, _ = exported
    side = json.loads((run / "model.onnx.json").read_text())
    classes = json.loads((run / "class_map.json").read_text())["classes"]
    cal = json.loads((run / "calibration.json").read_text()) if (run / "calibration.json").is_file() else {}
    abst = json.loads((run / "abstention.json").read_text()) if (run / "abstention.json").is_file() else {}
    assert side["classes"] == classes and side["preprocessing"]["input_size"] == 224
    assert side["temperature"] == cal.get("temperature", 1.0) and side["threshold"] == abst.get("threshold")
    assert side["parity"]["max_abs_diff"] < 1e-4 and side["parity"]["top1_agree"] == 1.0
    alone = tmp_path / "deploy"
    alone.mkdir()
    for f in ("model.onnx", "model.onnx.json"):
        shutil.copy(run / f, alone / f)
    p = Predictor.from_onnx(alone / "model.onnx")
    assert p.classes == classes and p.threshold == side["threshold"] and p.temperature == side["temperature"]
    path = _real_images(run)[0]
    assert p.predict([path])[0].labels == Predictor.from_run(run, backend="torch").predict([path])[0].labels
    # from a run directory, temperature and threshold come from the run's current files, not the sidecar
    (run / "abstention.json").write_text(json.dumps({"threshold": 0.123}))
    assert Predictor.from_run(run, backend="auto").threshold == 0.123


def test_missing_or_foreign_sidecar(exported, tmp_path):
    run, _ = exported
    shutil.copy(run / "model.onnx", tmp_path / "model.onnx")
    with pytest.raises(FileNotFoundError, match="model.onnx.json"):
        Predictor.from_onnx(tmp_path / "model.onnx")
    side = json.loads((run / "model.onnx.json").read_text())
    (tmp_path / "model.onnx.json").write_text(json.dumps({**side, "classes": side["classes"][:2]}))
    with pytest.raises(ValueError, match="2 classes"):
        Predictor.from_onnx(tmp_path)
    (tmp_path / "model.onnx.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a prodclass ONNX sidecar"):
        Predictor.from_onnx(tmp_path / "model.onnx")


def test_export_of_a_folder_without_model_fails_in_one_line(tmp_path):
    res = CliRunner().invoke(app, ["export", str(tmp_path)])
    assert res.exit_code == 2 and "model.json: missing" in res.output


def test_int8_export_records_its_accuracy(exported):
    from prodclass.serving.export import quantize_int8

    run, _ = exported
    info = quantize_int8(run, json.loads((run / "model.onnx.json").read_text()), calibration_images=32)
    side = json.loads((run / "model.int8.onnx.json").read_text())
    assert side["model"] == "model.int8.onnx" and side["quantization"] == info
    assert info["test_n"] == len(_real_images(run)) and info["calibration_images"] == 32
    assert info["top1_agree"] >= 0.8  # 5 distinct classes: INT8 keeps nearly every decision
    p = Predictor.from_run(run, backend="onnx-int8")
    assert p.predict(_real_images(run)[:1])[0].labels[0] in p.classes
