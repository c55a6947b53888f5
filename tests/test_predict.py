"""The Predictor on a real tiny run: the training preprocessing, input kinds, order, errors, abstention."""

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from prodclass.runs import RunDir, RunDirError
from prodclass.serving.predictor import Prediction, Predictor

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def predictor(tiny_run):
    return Predictor.from_run(tiny_run)


def test_logits_match_the_runs_stored_test_predictions(tiny_run, predictor):
    # the stored logits were computed by the same Predictor path during the run
    table, logits = RunDir(tiny_run).read_predictions("test")
    x = np.stack([predictor.preprocessing(p) for p in table["image_path"]])
    np.testing.assert_allclose(predictor.predict_logits(x), logits, atol=1e-3)
    t = json.loads((tiny_run / "calibration.json").read_text())["temperature"] if (tiny_run / "calibration.json").is_file() else 1.0
    assert predictor.temperature == t
    probs = predictor.predict_proba(x)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == table["y_pred"].to_numpy()).all()


def test_paths_bytes_and_pil_images_give_the_same_answer(tiny_run, predictor):
    path = pd.read_parquet(tiny_run / "predictions_test.parquet")["image_path"].iloc[0]
    raw = open(path, "rb").read()
    a, b, c = predictor.predict([path, raw, Image.open(io.BytesIO(raw))], top_k=3)
    assert a.labels == b.labels == c.labels and len(a.labels) == 3
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)
    np.testing.assert_allclose(a.probs, c.probs, atol=1e-6)
    assert a.probs == sorted(a.probs, reverse=True) and a.error is None


def test_order_errors_and_batching(tiny_run, predictor, tmp_path):
    paths = pd.read_parquet(tiny_run / "predictions_test.parquet")["image_path"].tolist()[:7]
    (tmp_path / "notes.txt").write_text("not an image")
    inputs = paths[:3] + [str(tmp_path / "missing.jpg"), str(tmp_path / "notes.txt"), b""] + paths[3:]
    preds = predictor.predict(inputs, top_k=2, batch_size=3)
    assert len(preds) == len(inputs)
    errors = [p.error for p in preds]
    assert "does not exist" in errors[3] and "notes.txt" in errors[4] and "empty" in errors[5]
    assert all(e is None for i, e in enumerate(errors) if i not in (3, 4, 5))
    assert all(p.labels == [] and not p.abstain for p in preds[3:6])
    big = predictor.predict(paths, top_k=2, batch_size=32)  # batch size changes nothing
    ok = [p for p in preds if p.error is None]
    assert [p.labels for p in ok] == [p.labels for p in big]
    np.testing.assert_allclose([p.probs for p in ok], [p.probs for p in big], atol=1e-5)
    assert predictor.predict([]) == []
    assert Prediction(labels=["a"], probs=[0.5]).to_dict() == {"labels": ["a"], "probs": [0.5], "abstain": False, "error": None}


def test_abstain_flag_follows_the_runs_threshold(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    paths = pd.read_parquet(run / "predictions_test.parquet")["image_path"].tolist()
    top = [p.probs[0] for p in Predictor.from_run(run).predict(paths)]
    t = float(np.median(top))
    (run / "abstention.json").write_text(json.dumps({"threshold": t}))
    preds = Predictor.from_run(run).predict(paths)
    assert [p.abstain for p in preds] == [p.probs[0] < t for p in preds]
    assert 0 < sum(p.abstain for p in preds) < len(preds)
    (run / "abstention.json").unlink()
    assert not any(p.abstain for p in Predictor.from_run(run).predict(paths))


def test_unknown_backend_and_missing_run(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="unknown backend"):
        Predictor.from_run(tiny_run, backend="tensorrt")
    with pytest.raises(RunDirError, match="model.json: missing"):
        Predictor.from_run(tmp_path)
    with pytest.raises(RunDirError, match="not a run directory"):
        Predictor.from_run(tmp_path / "nowhere")
