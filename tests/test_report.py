"""The run report: plots, report page content (hand-made inputs and a real tiny run), compare."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image
from sklearn import metrics as skm
from typer.testing import CliRunner

from prodclass.config import dump_config, validate_config
from prodclass.evaluation import plots
from prodclass.evaluation.calibration import expected_calibration_error
from prodclass.evaluation.compare import compare_runs, markdown_table, write_comparison
from prodclass.evaluation.metrics import stage_spans
from prodclass.evaluation.metrics import test_metrics as compute_test_metrics
from prodclass.evaluation.report import SECTIONS, ReportInputs, inputs_from_run, render_report
from prodclass.inference import softmax
from prodclass.runs import RunDir, RunDirError

EVALUATION = Path(__file__).resolve().parents[1] / "src" / "prodclass" / "evaluation"


def _img_srcs(page: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)


def _history() -> list[dict]:
    hist = [{"epoch": e, "stage": "head", "train_loss": 1 / e, "val_loss": 1.2 / e, "train_acc": 0.5, "val_acc": 0.4,
             "best": e == 3} for e in range(1, 5)]
    return hist + [{"epoch": e, "stage": "finetune", "train_loss": 0.2, "val_loss": 0.3, "train_acc": 0.9,
                    "val_acc": 0.8, "best": e == 2} for e in range(1, 4)]


def make_inputs(tmp_path: Path, n_classes: int = 6, n: int = 90, calibrated: bool = True, seed: int = 0) -> ReportInputs:
    """Report inputs from random logits (about a quarter wrong): real JPEGs on disk, every 7th one missing."""
    rng = np.random.default_rng(seed)
    classes = [f"class {i}" for i in range(n_classes)]
    classes[1] = "<b>bold</b> & co"
    y = rng.integers(0, n_classes, n)
    z = rng.normal(size=(n, n_classes)).astype(np.float32)
    z[np.arange(n), y] += 2.5
    pics = []
    for i in range(3):
        pics.append(tmp_path / f"img{i}.jpg")
        Image.new("RGB", (60, 40), (80 * i, 120, 200)).save(pics[-1])
    paths = [str(tmp_path / "gone" / f"missing{i}.jpg") if i % 7 == 0 else str(pics[i % 3]) for i in range(n)]
    temperature = 1.4 if calibrated else None
    cfg = validate_config({"name": "unit", "data": {"path": "catalog.csv", "image_dir": "images"},
                           "curation": {"merge": {"<sofa>": "couch"}, "drop": ["junk"], "max_per_class": 50},
                           "eval": {"top_k": 3}})
    metrics = {**compute_test_metrics(y, z, classes, temperature, cfg.eval.top_k), "split_sizes": {"test": n}}
    counts = pd.DataFrame({"label": classes + ["junk"], "raw": [30] * n_classes + [4],
                           "curated": [25] * n_classes + [0], "train": [15] * n_classes + [0],
                           "val": [3] * n_classes + [0], "test": [7] * n_classes + [0]})
    split_table = pd.DataFrame({"label": [classes[i % n_classes] for i in range(150)],
                                "split": ["train"] * 100 + ["val"] * 20 + ["test"] * 30})
    cal = {"temperature": 1.4, "val": {"n": 20, "ece_before": 0.2, "ece_after": 0.05},
           "warning": "T = 1.4 looks <odd>"} if calibrated else {}
    abst = {"threshold": 0.612, "target_precision": 0.95, "test": {"coverage": 0.81, "precision": 0.955}}
    return ReportInputs(cfg=cfg, run_name="unit-20250101-000000", classes=classes, y_true=y, logits=z,
                        image_paths=paths, metrics=metrics, calibration=cal, abstention=abst if calibrated else {},
                        history=_history() if calibrated else [], counts=counts if calibrated else None,
                        split_table=split_table if calibrated else None,
                        versions={"prodclass": "9.9", "torch": "2.x", "timm": "1.x", "scikit-learn": "1.x"})


# ------------------------------------------------------------------------------------------ plots

def test_stage_boundaries_are_marked():
    hist = _history()
    assert stage_spans(hist) == [("head", 1, 4), ("finetune", 5, 7)]
    fig = plots.plot_training_curves(hist)
    vlines = [ln for ln in fig.axes[0].lines if list(ln.get_xdata()) == [4.5, 4.5]]
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert len(vlines) == 1 and labels == ["head", "finetune"]


def test_plots_return_figures(tmp_path):
    inp = make_inputs(tmp_path, n_classes=5, n=60)
    y, p = inp.y_true, softmax(inp.logits)
    cm = plots.plot_confusion(y, p.argmax(1), inp.classes, rows=[0, 3], title="zoom")
    assert isinstance(cm, Figure) and [t.get_text() for t in cm.axes[0].get_xticklabels()] == ["class 0", "class 3"]
    assert cm.axes[0].get_title() == "zoom"
    from prodclass.evaluation.metrics import ovr_metrics

    ovr = ovr_metrics(y, p, inp.classes)
    roc = plots.plot_roc_pr(y, p, inp.classes, ovr["per_class"], ovr, worst=2)
    assert len(roc.axes) == 2 and len(roc.axes[0].lines) == 2 + 2 + 1  # micro, macro, 2 worst, chance
    rel = plots.plot_reliability(y, [("a", p), ("b", softmax(inp.logits, 2.0))])
    assert [ax.get_title().splitlines()[0] for ax in rel.axes[:2]] == ["a", "b"]
    assert f"ECE {expected_calibration_error(p, y):.4f}" in rel.axes[0].get_title()
    many = pd.DataFrame({"label": [f"l{i}" for i in range(70)], "raw": np.arange(70) + 5, "curated": np.arange(70)})
    counts = plots.plot_class_counts(many)
    assert counts.axes[0].get_title() == "Images per class (70 labels, top 60 shown)"
    assert plots.figure_to_data_uri(counts).startswith("data:image/png;base64,iVBOR")


def test_thumbnail_uri(tmp_path):
    Image.new("RGB", (400, 200), "red").save(tmp_path / "a.png")
    uri = plots.thumbnail_uri(tmp_path / "a.png", size=50)
    assert uri.startswith("data:image/jpeg;base64,")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    assert plots.thumbnail_uri(tmp_path / "bad.jpg") is None and plots.thumbnail_uri(tmp_path / "nope.jpg") is None


# ------------------------------------------------------------------------------ report, hand-made

def test_render_report_on_handmade_inputs(tmp_path):
    inp = make_inputs(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    page = render_report(inp, max_gallery=4)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # renders, writes nothing
    # every section in order, after the summary
    assert [m for m in re.findall(r'<section id="([^"]+)">', page)] == ["summary", *SECTIONS]
    for sid, title in SECTIONS.items():
        assert f'<section id="{sid}"><h2>{title}</h2>' in page
    # headline numbers are the metrics' (top-k from cfg.eval.top_k)
    m = inp.metrics
    assert f'<div class="v">{m["accuracy"]:.3f}</div><div class="k">test accuracy</div>' in page
    assert f'<div class="v">{m["top3_accuracy"]:.3f}</div><div class="k">top-3 accuracy</div>' in page
    assert f"{m['ece_before']:.3f} → {m['ece_after']:.3f}" in page and "T = 1.400" in page
    # dataset section from RunConfig attributes, counts and the split table
    assert "source <code>table</code>: catalog.csv (images: images), label column <code>product_type</code>" in page
    assert "merge: &lt;sofa&gt; → couch" in page and "drop: junk" in page and "max per class: 50" in page
    assert "train 0.7 / val 0.1 / test 0.2 (seed 0)" in page
    assert "Before curation: 184 images with 7 labels. After: 150 images in 6 classes." in page
    assert "<td>train</td><td>100</td><td>6</td>" in page
    assert "7 epochs: head (epochs 1–4), finetune (epochs 5–7)" in page and "finetune 2 (val loss 0.3000" in page
    # every value is escaped: class names, the warning
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt; &amp; co" in page
    assert "<b>Warning:</b> T = 1.4 looks &lt;odd&gt;." in page
    assert "minimising NLL on 20 validation images; there ECE went 0.2000 → 0.0500" in page
    assert "top-1 probability <b>0.612</b> go to review" in page and "precision 0.955" in page
    # five plots, a thumbnail per readable shown mistake, all data URIs
    p = softmax(inp.logits, 1.4)
    wrong = np.nonzero(p.argmax(1) != inp.y_true)[0]
    shown = wrong[np.argsort(-p[wrong].max(1), kind="stable")][:4]
    readable = sum(i % 7 != 0 for i in shown)
    srcs = _img_srcs(page)
    assert len(srcs) == 5 + readable and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,"))
                                             for s in srcs)
    assert page.count('<div class="tile">') == 4 and page.count("image missing") == 4 - readable
    assert f"{len(wrong)} of {len(inp.y_true)} test images misclassified; the 4 shown are" in page
    confs = [float(c) for c in re.findall(r"<div>confidence (\d\.\d\d)</div>", page)]
    assert confs == pytest.approx(np.round(p[shown].max(1), 2), abs=0.006) and confs == sorted(confs, reverse=True)
    assert "missing0.jpg" not in page  # a placeholder, never a broken <img>
    assert "by prodclass 9.9 from unit-20250101-000000; torch 2.x, timm 1.x," in page


def test_report_without_calibration_history_or_counts(tmp_path):
    inp = make_inputs(tmp_path, calibrated=False)
    page = render_report(inp)
    assert "No temperature calibration for this run" in page and "(no temperature calibration in this run)" in page
    assert "ECE (uncalibrated)" in page and "No training history in this run." in page
    assert "Abstention" not in page and "Before curation" not in page and "Warning" not in page
    assert "log loss (T = 1.000)</td><td>–</td>" in page  # no calibrated figures: shown as missing
    assert len(_img_srcs(page)) - page.count('<div class="tile"><img') == 3  # confusion, ROC/PR, reliability


def test_report_zooms_and_scrolls_with_many_classes(tmp_path):
    inp = make_inputs(tmp_path, n_classes=45, n=300)
    page = render_report(inp, max_gallery=0)
    assert "<h3>Zoom: classes in the top confused pairs</h3>" in page
    assert '<div class="scrollxy"><img class="wide"' in page
    assert len(_img_srcs(page)) == 6 and "no mistakes" not in page and "test images misclassified." in page


def test_report_of_a_perfect_model(tmp_path):
    inp = make_inputs(tmp_path, n=30, calibrated=False)
    inp.logits = np.eye(len(inp.classes), dtype=np.float32)[inp.y_true] * 8
    inp.metrics = compute_test_metrics(inp.y_true, inp.logits, inp.classes, None, 3)
    page = render_report(inp)
    assert "0 of 30 test images misclassified: no mistakes on the test split." in page
    assert "<h3>Top confused pairs</h3>" not in page and '<div class="tile">' not in page


def test_render_report_checks_its_inputs(tmp_path):
    inp = make_inputs(tmp_path, n=30)
    inp.metrics = {k: v for k, v in inp.metrics.items() if k not in ("ece_after", "roc_auc_micro")}
    with pytest.raises(ValueError, match="metrics lack ece_after, roc_auc_micro"):
        render_report(inp)
    inp = make_inputs(tmp_path, n=30)
    inp.logits = inp.logits[:, :4]
    with pytest.raises(ValueError, match=r"got logits \(30, 4\)"):
        render_report(inp)


def test_evaluation_spells_no_run_file_name():
    """Only RunDir knows the run's file names; the report reads and writes nothing by name."""
    run = RunDir("x")
    names = {getattr(run, a).name for a in dir(RunDir) if a.endswith(("_file", "_plot")) and
             isinstance(getattr(RunDir, a), property)} | {"predictions_", "report.html"}
    assert {"metrics.json", "class_counts.csv", "calibration.json"} <= names
    mine = ["report.py", "metrics.py", "plots.py", "compare.py", *(f"templates/{p.name}" for p in
                                                                   (EVALUATION / "templates").glob("*.j2"))]
    for rel in mine:
        text = (EVALUATION / rel).read_text(encoding="utf-8")
        assert not [n for n in names if n in text], rel
    for f in EVALUATION.rglob("*.py"):  # the whole stage: never the four the report used to handle itself
        text = f.read_text(encoding="utf-8")
        assert not [n for n in ("metrics.json", "predictions_", "report.html", "class_counts.csv") if n in text], f


# ---------------------------------------------------------------------------------------- compare

def test_markdown_and_csv_comparison(tmp_path):
    df = pd.DataFrame({"run": ["a|b", "c"], "accuracy": [0.91234, np.nan], "classes": [5, 7]})
    md = markdown_table(df)
    assert md.splitlines()[1] == "|---|---:|---:|"
    assert "| a\\|b | 0.9123 | 5 |" in md and "| c | – | 7 |" in md
    write_comparison(df, tmp_path / "t.csv")
    assert pd.read_csv(tmp_path / "t.csv")["classes"].tolist() == [5, 7]
    with pytest.raises(ValueError, match="use .md or .csv"):
        write_comparison(df, tmp_path / "t.xlsx")


def test_compare_runs_reads_through_rundir(tmp_path):
    a, b = RunDir(tmp_path / "a"), RunDir(tmp_path / "b")
    for run, acc in ((a, 0.9), (b, 0.8)):
        run.path.mkdir()
        run.write_metrics({"accuracy": acc, "macro_f1": acc - 0.1, "num_classes": 5, "n": 40, "ece_after": None})
    a.write_config(dump_config(validate_config({"data": {"path": "x.csv"}, "model": {"head": "linear"}})))
    t = compare_runs([a.path, b.path])
    assert t["run"].tolist() == ["a", "b"] and t["accuracy"].tolist() == [0.9, 0.8]
    assert t["backbone"].iloc[0] == "efficientnet_lite0" and t["head"].iloc[0] == "linear"
    assert t[["backbone", "head"]].iloc[1].isna().all()  # a run without its config
    assert t["test images"].tolist() == [40, 40] and t["ECE (T)"].isna().all()
    with pytest.raises(RunDirError, match="metrics.json: missing"):
        compare_runs([tmp_path])


# ------------------------------------------------------------------------------ on a real tiny run

@pytest.fixture
def noisy_run(tiny_run, tmp_path):
    """A copy of the tiny run whose test logits are rolled for 5 rows, so that it makes mistakes."""
    run = RunDir(shutil.copytree(tiny_run, tmp_path / "noisy"))
    t = pd.read_parquet(run.predictions_file("test"))
    for i in range(5):
        t.at[i, "logits"] = np.roll(t.at[i, "logits"], 1 + i % 3)
    t.to_parquet(run.predictions_file("test"))
    return run.path


def _snapshot(path: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in path.iterdir()}


@pytest.mark.shared_data
def test_pipeline_wrote_report_and_calibration(tiny_run):
    run = RunDir(tiny_run)
    assert run.report_file.is_file() and run.calibration_file.is_file()
    m, cal = run.read_metrics(), run.read_calibration()
    assert m["temperature"] == pytest.approx(cal["temperature"]) and m["ece_after"] == pytest.approx(cal["ece_after"])
    assert {"embedding", "wall_seconds", "split_sizes", "macro_f1", "roc_auc_macro", "report"} <= set(m)
    # the stored headline numbers are test_metrics() of the stored test predictions
    t, z = run.read_predictions("test")
    again = compute_test_metrics(t["y_true"].to_numpy(), z, run.read_classes(), cal["temperature"],
                                 run.read_config().eval.top_k)
    assert {k: m[k] for k in again} == pytest.approx(again)


@pytest.mark.shared_data
def test_report_on_a_run_with_mistakes(noisy_run):
    run = RunDir(noisy_run)
    before = run.read_metrics()
    run.abstention_file.write_text(json.dumps(
        {"threshold": 0.612, "target_precision": 0.95, "test": {"coverage": 0.81, "precision": 0.955}}))
    files = _snapshot(noisy_run)
    inputs = inputs_from_run(run)
    page = render_report(inputs, max_gallery=3)
    assert _snapshot(noisy_run) == files  # reading and rendering write nothing; metrics.json stays the pipeline's
    m = inputs.metrics
    assert all(m[k] == before[k] for k in ("embedding", "wall_seconds", "split_sizes", "n"))  # extras kept
    t, z = run.read_predictions("test")
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
    run = RunDir(noisy_run)
    t = pd.read_parquet(run.predictions_file("test"))
    t["image_path"] = "/nonexistent/gone.jpg"
    t.to_parquet(run.predictions_file("test"))
    run.calibration_file.unlink()
    inputs = inputs_from_run(run)
    page = render_report(inputs)
    m = inputs.metrics
    assert m["ece_after"] is None and m["temperature"] is None and "No temperature calibration" in page
    assert "image missing" in page and "gone.jpg" not in page  # a placeholder, never a broken <img>


@pytest.mark.shared_data
def test_cli_report_and_compare(noisy_run, tiny_run, tmp_path):
    from prodclass.cli import app

    runner = CliRunner()
    run = RunDir(noisy_run)
    run.report_file.unlink()
    metrics_before = run.metrics_file.read_bytes()
    out = runner.invoke(app, ["report", str(noisy_run)])
    assert out.exit_code == 0, out.output
    assert "ROC AUC macro" in out.output and run.report_file.name in out.output
    assert run.report_file.is_file() and run.metrics_file.read_bytes() == metrics_before  # one writer: the pipeline
    out = runner.invoke(app, ["compare", str(tiny_run), str(noisy_run), "-o", str(tmp_path / "c.md"),
                              "-o", str(tmp_path / "c.csv")])
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 4 and "macro F1" in lines[0] and "ECE (T)" in lines[0]
    t = pd.read_csv(tmp_path / "c.csv")
    assert t["run"].tolist() == [tiny_run.name, noisy_run.name]
    assert (tmp_path / "c.md").read_text() == out.output
    table = compare_runs([tiny_run])
    assert table["backbone"].tolist() == ["efficientnet_lite0"]
    out = runner.invoke(app, ["compare", str(tmp_path)])
    assert out.exit_code == 2 and "metrics.json: missing" in out.output
