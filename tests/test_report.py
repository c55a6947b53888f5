"""The run report: metric functions against scikit-learn, report.html content, metrics.json, compare."""

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm
from typer.testing import CliRunner

from prodclass.evaluation.calibration import expected_calibration_error, softmax
from prodclass.evaluation.report import (SECTIONS, compare_runs, confused_pairs, markdown_table, ovr_metrics,
                              plot_training_curves, stage_spans, write_comparison, write_report)


def _random_probs(n=300, c=6, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    z = rng.normal(size=(n, c))
    z[np.arange(n), y] += rng.uniform(0, 3, n)  # informative but imperfect
    return y, softmax(z)


def test_ovr_metrics_match_sklearn():
    y, p = _random_probs()
    m = ovr_metrics(y, p, [f"c{i}" for i in range(6)])
    Y = np.eye(6)[y]
    assert m["roc_auc_macro"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["roc_auc_micro"] == pytest.approx(skm.roc_auc_score(Y, p, average="micro"))
    assert m["average_precision_macro"] == pytest.approx(skm.average_precision_score(Y, p, average="macro"))
    assert m["average_precision_micro"] == pytest.approx(skm.average_precision_score(Y, p, average="micro"))
    assert m["per_class"]["roc_auc"].to_numpy() == pytest.approx(skm.roc_auc_score(Y, p, average=None))
    assert 0.5 < m["roc_auc_macro"] < 1


def test_ovr_metrics_skip_a_class_absent_from_the_test_split():
    y, p = _random_probs(c=4)
    y[y == 3] = 0
    m = ovr_metrics(y, p, list("abcd"))
    assert np.isnan(m["per_class"]["roc_auc"].iloc[3])
    Y = np.eye(4)[y][:, :3]
    assert m["roc_auc_macro"] == pytest.approx(skm.roc_auc_score(Y, p[:, :3], average="macro"))


def test_confused_pairs_counts_and_shares():
    classes = ["a", "b", "c"]
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 2, 1, 0, 2, 2])
    t = confused_pairs(y_true, y_pred, classes)
    assert t.iloc[0].tolist() == ["a", "b", 2, 0.5]
    assert len(t) == 3 and set(zip(t["true"], t["predicted"])) == {("a", "b"), ("a", "c"), ("b", "a")}


def test_stage_boundaries_are_marked():
    hist = [{"epoch": e, "stage": "head", "train_loss": 1 / e, "val_loss": 1.2 / e, "train_acc": 0.5, "val_acc": 0.4,
             "best": e == 3} for e in range(1, 5)]
    hist += [{"epoch": e, "stage": "finetune", "train_loss": 0.2, "val_loss": 0.3, "train_acc": 0.9, "val_acc": 0.8,
              "best": e == 2} for e in range(1, 4)]
    assert stage_spans(hist) == [("head", 1, 4), ("finetune", 5, 7)]
    fig = plot_training_curves(hist)
    vlines = [ln for ln in fig.axes[0].lines if list(ln.get_xdata()) == [4.5, 4.5]]
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert len(vlines) == 1 and labels == ["head", "finetune"]


def test_markdown_and_csv_comparison(tmp_path):
    df = pd.DataFrame({"run": ["a|b", "c"], "accuracy": [0.91234, np.nan], "classes": [5, 7]})
    md = markdown_table(df)
    assert md.splitlines()[1] == "|---|---:|---:|"
    assert "| a\\|b | 0.9123 | 5 |" in md and "| c | – | 7 |" in md
    write_comparison(df, tmp_path / "t.csv")
    assert pd.read_csv(tmp_path / "t.csv")["classes"].tolist() == [5, 7]
    with pytest.raises(ValueError, match="use .md or .csv"):
        write_comparison(df, tmp_path / "t.xlsx")


# ------------------------------------------------------------------------------ on a real tiny run

def _img_srcs(page: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)


@pytest.fixture
def noisy_run(tiny_run, tmp_path):
    """A copy of the tiny run whose test logits are rolled for 5 rows, so that it makes mistakes."""
    run = shutil.copytree(tiny_run, tmp_path / "noisy")
    t = pd.read_parquet(run / "predictions_test.parquet")
    for i in range(5):
        t.at[i, "logits"] = np.roll(t.at[i, "logits"], 1 + i % 3)
    t.to_parquet(run / "predictions_test.parquet")
    return run


@pytest.mark.shared_data
def test_pipeline_wrote_report_and_calibration(tiny_run):
    assert (tiny_run / "report.html").is_file() and (tiny_run / "calibration.json").is_file()
    m = json.loads((tiny_run / "metrics.json").read_text())
    cal = json.loads((tiny_run / "calibration.json").read_text())
    assert m["temperature"] == pytest.approx(cal["temperature"]) and m["ece_after"] == pytest.approx(cal["ece_after"])
    assert {"embedding", "wall_seconds", "split_sizes", "macro_f1", "roc_auc_macro", "report"} <= set(m)


@pytest.mark.shared_data
def test_report_on_a_run_with_mistakes(noisy_run):
    from prodclass.pipeline import load_predictions

    before = json.loads((noisy_run / "metrics.json").read_text())
    (noisy_run / "abstention.json").write_text(json.dumps(
        {"threshold": 0.612, "target_precision": 0.95, "test": {"coverage": 0.81, "precision": 0.955}}))
    m = write_report(noisy_run, max_gallery=3)
    page = (noisy_run / "report.html").read_text()
    # metrics.json extended, not replaced; the added figures are scikit-learn's / Guo et al.'s
    on_disk = json.loads((noisy_run / "metrics.json").read_text())
    assert on_disk == m and all(on_disk[k] == before[k] for k in ("embedding", "wall_seconds", "split_sizes", "n"))
    t, z = load_predictions(noisy_run, "test")
    y, p = t["y_true"].to_numpy(), softmax(z, m["temperature"])
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, z.argmax(1)))
    assert m["accuracy"] < before["accuracy"]
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, z.argmax(1), average="macro"))
    assert m["roc_auc_macro"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["ece_before"] == pytest.approx(expected_calibration_error(softmax(z), y))
    assert m["ece_after"] == pytest.approx(expected_calibration_error(p, y))
    # every section, self-contained images, a gallery of the most confident mistakes
    for sid, title in SECTIONS.items():
        assert f'<section id="{sid}"><h2>{title}</h2>' in page
    srcs = _img_srcs(page)
    assert len(srcs) >= 7 and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in srcs)
    wrong = np.nonzero(p.argmax(1) != y)[0]
    assert len(wrong) >= 3 and page.count('<div class="tile">') == 3
    assert f"{len(wrong)} of {len(y)} test images misclassified" in page
    conf = p[wrong, p[wrong].argmax(1)]
    shown = re.findall(r"confidence (\d\.\d\d)</div>", page)
    assert [float(c) for c in shown] == pytest.approx(sorted(np.round(conf, 2), reverse=True)[:3], abs=0.006)
    assert "top-1 probability <b>0.612</b> go to review" in page and "precision 0.955" in page
    assert len(page) < 3_000_000


@pytest.mark.shared_data
def test_missing_image_and_missing_calibration(noisy_run):
    t = pd.read_parquet(noisy_run / "predictions_test.parquet")
    t["image_path"] = "/nonexistent/gone.jpg"
    t.to_parquet(noisy_run / "predictions_test.parquet")
    (noisy_run / "calibration.json").unlink()
    m = write_report(noisy_run)
    page = (noisy_run / "report.html").read_text()
    assert m["ece_after"] is None and m["temperature"] is None and "No calibration.json" in page
    assert "image missing" in page and "gone.jpg" not in page  # a placeholder, never a broken <img>


@pytest.mark.shared_data
def test_cli_report_and_compare(noisy_run, tiny_run, tmp_path):
    from prodclass.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["report", str(noisy_run)])
    assert out.exit_code == 0, out.output
    assert "ROC AUC macro" in out.output and "report.html" in out.output
    out = runner.invoke(app, ["compare", str(tiny_run), str(noisy_run), "-o", str(tmp_path / "c.md"),
                              "-o", str(tmp_path / "c.csv")])
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 4 and "macro F1" in lines[0] and "ECE (T)" in lines[0]
    t = pd.read_csv(tmp_path / "c.csv")
    assert t["run"].tolist() == [tiny_run.name, noisy_run.name] and t["accuracy"].iloc[0] > t["accuracy"].iloc[1]
    assert (tmp_path / "c.md").read_text() == out.output
    table = compare_runs([tiny_run])
    assert table["backbone"].tolist() == ["efficientnet_lite0"]
    out = runner.invoke(app, ["compare", str(tmp_path)])
    assert out.exit_code == 2 and "metrics.json: missing" in out.output
