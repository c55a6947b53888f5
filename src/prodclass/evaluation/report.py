"""The run report: one self-contained HTML page a person reads, rendered from Jinja2 templates.

Owns what the page shows and in which order; not the numbers (:mod:`prodclass.evaluation.metrics`),
not the figures (:mod:`prodclass.evaluation.plots`), not the markup or the stylesheet
(``evaluation/templates/*.j2``), and not files: :func:`render_report` takes a
:class:`ReportInputs` and returns the page as a string; the caller stores it
(``RunDir.write_report``). :func:`inputs_from_run` gathers the inputs of a finished run through
:class:`prodclass.runs.RunDir` (``prodclass report RUN_DIR``), recomputing the headline numbers
from the stored test logits with :func:`prodclass.evaluation.metrics.test_metrics`.

Images are embedded as data URIs (plots as PNG, thumbnails as small JPEG), so the page opens
offline and can be mailed or archived alone. Sections, in page order: headline figures, dataset,
training curves, overall metrics, per-class table (worst first), confusion matrix and top
confused pairs, one-vs-rest ROC/PR curves, reliability diagrams and the abstention threshold,
misclassified test images (most confident mistakes first).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd

from prodclass.config import RunConfig
from prodclass.evaluation.calibration import N_BINS
from prodclass.evaluation.metrics import (
    CALIBRATION_KEYS,
    OVR_KEYS,
    confused_pairs,
    ovr_metrics,
    per_class_table,
    stage_spans,
    test_metrics,
)
from prodclass.evaluation.plots import (
    figure_to_data_uri,
    plot_class_counts,
    plot_confusion,
    plot_reliability,
    plot_roc_pr,
    plot_training_curves,
    thumbnail_uri,
)
from prodclass.inference import softmax
from prodclass.runs import RunDir

SECTIONS = {"dataset": "Dataset", "training": "Training curves", "metrics": "Overall metrics",
            "per-class": "Per-class results", "confusion": "Confusion matrix", "roc-pr": "ROC and PR curves",
            "calibration": "Calibration", "errors": "Misclassified test images"}
ZOOM_ABOVE = 15  # more classes than this: a second confusion matrix of the classes in the top confused pairs
WIDE_ABOVE = 40  # more classes than this: the confusion matrix keeps its size and scrolls


@dataclass
class ReportInputs:
    """Everything the report shows, as values (no file is read while rendering except thumbnails).

    Attributes:
        cfg: the run's resolved configuration.
        run_name: shown under the title and in the footer (the run directory's name).
        classes: the C class names (class id → name).
        y_true: int ``(N,)`` test class ids.
        logits: float ``(N, C)`` test logits.
        image_paths: the N test image paths (thumbnails of the mistakes).
        metrics: :func:`prodclass.evaluation.metrics.test_metrics` output, possibly merged with
            the pipeline's extras (``split_sizes``, ``epochs``, ...); its ``temperature`` (None:
            T = 1) is the one applied to the logits for every calibrated figure.
        calibration: the run's calibration record (``temperature``, ``val``, ``warning``); ``{}`` if none.
        abstention: the run's abstention record (``threshold``, ``target_precision``, ``test``); ``{}`` if none.
        history: per-epoch training records (``stage, epoch, train_loss, val_loss, train_acc,
            val_acc, best``); ``[]`` if none.
        counts: class counts (``label, raw, curated, train, val, test``), or None.
        split_table: the curated dataset's ``label, split`` columns, or None.
        versions: library versions (``prodclass, torch, timm, scikit-learn``, ...); ``{}`` if unknown.
    """

    cfg: RunConfig
    run_name: str
    classes: list[str]
    y_true: np.ndarray
    logits: np.ndarray
    image_paths: list[str]
    metrics: dict
    calibration: dict
    abstention: dict
    history: list[dict]
    counts: pd.DataFrame | None
    split_table: pd.DataFrame | None
    versions: dict


def render_report(inputs: ReportInputs, max_gallery: int = 60) -> str:
    """The report page for ``inputs``, as one self-contained HTML string. Writes nothing.

    Args:
        inputs: see :class:`ReportInputs`.
        max_gallery: most misclassified images shown (most confident mistakes first).

    Raises:
        ValueError: arrays of mismatched shapes, or ``inputs.metrics`` lacking a key of
            :func:`prodclass.evaluation.metrics.test_metrics` (the message names them).
    """
    _check(inputs)
    classes, m = inputs.classes, inputs.metrics
    y = np.asarray(inputs.y_true, np.int64)
    calibrated = m["temperature"] is not None
    temp = float(m["temperature"]) if calibrated else 1.0
    p_raw = softmax(inputs.logits)
    p_cal = softmax(inputs.logits, temp) if calibrated else p_raw
    y_pred = p_cal.argmax(1)
    ovr = ovr_metrics(y, p_cal, classes)
    per_class = _per_class(y, y_pred, classes, ovr["per_class"], inputs.counts)
    cfg = inputs.cfg
    context = {
        "title": f"{cfg.name} — {cfg.model.backbone} + {cfg.model.head} head",
        "run_name": inputs.run_name, "sections": SECTIONS, "cfg": cfg, "n_bins": N_BINS,
        "m": m, "calibrated": calibrated, "temperature": temp, "n_test": len(y), "n_classes": len(classes),
        "summary": _summary(m, cfg.eval.top_k, calibrated, len(classes), len(y), int((y_pred != y).sum()),
                            per_class["class"].head(3).tolist()),
        "dataset": _dataset(inputs.counts, inputs.split_table),
        "training": _training(inputs.history),
        "metrics_table": _table(_metric_rows(m, cfg.eval.top_k, temp)),
        "per_class": _table(per_class),
        "confusion": _confusion(y, y_pred, classes),
        "roc_pr_uri": figure_to_data_uri(plot_roc_pr(y, p_cal, classes, ovr["per_class"], m)),
        "calibration": _calibration(y, p_raw, p_cal, inputs.calibration, calibrated, temp),
        "abstention": _abstention(inputs.abstention),
        "gallery": _gallery(inputs.image_paths, y, p_cal, classes, max_gallery),
        "generated": time.strftime("%Y-%m-%d %H:%M"),
        "versions": inputs.versions,
    }
    return _environment().get_template("page.j2").render(context)


def inputs_from_run(run: RunDir) -> ReportInputs:
    """The report inputs of a finished run, read only through ``run``'s methods.

    The headline numbers are recomputed with :func:`prodclass.evaluation.metrics.test_metrics`
    from the stored test logits and the stored temperature (so the page agrees with the stored
    predictions); the run's stored metrics contribute only the keys they add (pipeline extras).

    Raises:
        prodclass.runs.RunDirError: the run lacks its config, class map or test predictions, or a
            stored file is malformed (the message names the file).
    """
    cfg = run.read_config()
    classes = run.read_classes()
    table, logits = run.read_predictions("test")
    y = table["y_true"].to_numpy(np.int64)
    calibration = run.read_calibration()
    temperature = calibration.get("temperature") if calibration else None
    stored = run.read_metrics() if run.metrics_file.is_file() else {}
    metrics = {**stored, **test_metrics(y, logits, classes, temperature, cfg.eval.top_k)}
    split_table = run.read_dataset()[0][["label", "split"]] if run.has_dataset() else None
    return ReportInputs(cfg=cfg, run_name=run.path.name, classes=classes, y_true=y, logits=logits,
                        image_paths=table["image_path"].astype(str).tolist(), metrics=metrics,
                        calibration=calibration, abstention=run.read_abstention(), history=run.read_history(),
                        counts=run.read_class_counts(), split_table=split_table, versions=run.read_versions())


# ------------------------------------------------------------------------------- template plumbing

@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    """The package's templates; every ``{{ value }}`` is HTML-escaped (``.j2`` files are HTML here)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("prodclass.evaluation", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "j2"), default_for_string=True),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["num"] = _fmt
    env.tests["finite"] = _finite
    return env


def _finite(v) -> bool:
    return isinstance(v, (float, np.floating)) and bool(np.isfinite(v))


def _fmt(v, digits: int = 4) -> str:
    """A cell: floats to ``digits`` places, None/NaN as an en dash, anything else as text."""
    if v is None or (isinstance(v, (float, np.floating)) and not np.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v)


def _table(df: pd.DataFrame) -> dict:
    """A DataFrame as ``{"columns": [...], "rows": [[...], ...]}`` for the ``table`` macro."""
    return {"columns": [str(c) for c in df.columns], "rows": df.astype(object).to_numpy().tolist()}


def _check(inputs: ReportInputs) -> None:
    n, c = len(inputs.y_true), len(inputs.classes)
    if np.shape(inputs.logits) != (n, c) or len(inputs.image_paths) != n or n == 0:
        raise ValueError(f"report inputs: need (N, C) logits, N labels and N image paths with N > 0, C = {c} "
                         f"classes; got logits {np.shape(inputs.logits)}, {n} labels, {len(inputs.image_paths)} paths")
    missing = [k for k in ("accuracy", "macro_f1", "log_loss", *CALIBRATION_KEYS, *OVR_KEYS) if k not in inputs.metrics]
    if missing:
        raise ValueError(f"report inputs: metrics lack {', '.join(missing)} (compute them with test_metrics())")


# ----------------------------------------------------------------------------------- the sections

def _summary(m: dict, top_k: int, calibrated: bool, n_classes: int, n_test: int, n_errors: int,
             weakest: list[str]) -> dict:
    """Headline cards and the lead paragraph's numbers."""
    ece = f"{m['ece_before']:.3f} → {m['ece_after']:.3f}" if calibrated else m["ece_before"]
    cards = [("test accuracy", m["accuracy"]), (f"top-{top_k} accuracy", m.get(f"top{top_k}_accuracy")),
             ("macro F1", m["macro_f1"]), ("ROC AUC (macro)", m["roc_auc_macro"]),
             ("ECE before → after temperature" if calibrated else "ECE (uncalibrated)", ece),
             ("classes / test images", f"{n_classes} / {n_test}")]
    return {"cards": cards, "errors": n_errors, "weakest": weakest}


def _dataset(counts: pd.DataFrame | None, split_table: pd.DataFrame | None) -> dict:
    """Images before/after curation, images and classes per split, the class-count chart."""
    out: dict = {"before_after": None, "splits": None, "chart_uri": None}
    if counts is not None and {"raw", "curated"} <= set(counts.columns):
        raw, kept = counts["raw"], counts["curated"]
        out["before_after"] = {"raw_images": int(raw.sum()), "raw_labels": int((raw > 0).sum()),
                               "images": int(kept.sum()), "classes": int((kept > 0).sum())}
        out["chart_uri"] = figure_to_data_uri(plot_class_counts(counts))
    if split_table is not None:
        rows = []
        for split in ("train", "val", "test"):
            part = split_table[split_table["split"] == split]
            rows.append({"split": split, "images": len(part), "classes": int(part["label"].nunique())})
        out["splits"] = _table(pd.DataFrame(rows))
    return out


def _training(history: list[dict]) -> dict | None:
    """Epoch count, stage spans, kept epochs and the curves; None without a history."""
    if not history:
        return None
    kept = [{"stage": h.get("stage", "head"), "epoch": h.get("epoch"), "val_loss": h.get("val_loss"),
             "val_acc": h.get("val_acc")} for h in history if h.get("best")]
    return {"epochs": len(history), "spans": stage_spans(history), "kept": kept,
            "curves_uri": figure_to_data_uri(plot_training_curves(history))}


def _metric_rows(m: dict, top_k: int, temp: float) -> pd.DataFrame:
    """The overall-metrics table: ``metric, value``."""
    rows = [("accuracy", m["accuracy"]), (f"top-{top_k} accuracy", m.get(f"top{top_k}_accuracy"))]
    rows += [(f"{a} {b}", m.get(f"{a}_{b}")) for a in ("macro", "weighted") for b in ("precision", "recall", "f1")]
    rows += [("log loss (T = 1)", m["log_loss"]), (f"log loss (T = {temp:.3f})", m["log_loss_calibrated"]),
             (f"ECE, {N_BINS} bins (T = 1)", m["ece_before"]), (f"ECE, {N_BINS} bins (T = {temp:.3f})", m["ece_after"]),
             ("ROC AUC micro / macro", f"{m['roc_auc_micro']:.4f} / {m['roc_auc_macro']:.4f}"),
             ("average precision micro / macro", f"{m['average_precision_micro']:.4f} / {m['average_precision_macro']:.4f}")]
    return pd.DataFrame(rows, columns=["metric", "value"])


def _per_class(y: np.ndarray, y_pred: np.ndarray, classes: list[str], ovr: pd.DataFrame,
               counts: pd.DataFrame | None) -> pd.DataFrame:
    """Precision/recall/F1/support + ROC AUC/AP (+ training images), worst F1 first."""
    t = per_class_table(y, y_pred, classes).merge(ovr, on="class", how="left")
    if counts is not None and {"label", "train"} <= set(counts.columns):
        train = counts[["label", "train"]].rename(columns={"label": "class", "train": "train images"})
        t = t.merge(train.astype({"class": str}), on="class", how="left")
    return t


def _confusion(y: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """The full confusion matrix, the top confused pairs and (many classes) a zoom on them."""
    n = len(classes)
    pairs = confused_pairs(y, y_pred, classes)
    zoom_uri = None
    if len(pairs) and n > ZOOM_ABOVE:
        zoom = sorted({classes.index(c) for c in pd.concat([pairs["true"], pairs["predicted"]])})
        zoom_uri = figure_to_data_uri(plot_confusion(y, y_pred, classes, rows=zoom))
    return {"uri": figure_to_data_uri(plot_confusion(y, y_pred, classes), dpi=100), "wide": n > WIDE_ABOVE,
            "pairs": _table(pairs.rename(columns={"share": "share of true class"})) if len(pairs) else None,
            "zoom_uri": zoom_uri}


def _calibration(y: np.ndarray, p_raw: np.ndarray, p_cal: np.ndarray, cal: dict, calibrated: bool,
                 temp: float) -> dict:
    """The validation figures behind T, its warning, and the reliability diagrams."""
    panels = [("uncalibrated (T = 1)", p_raw)] + ([(f"temperature scaled (T = {temp:.3f})", p_cal)] if calibrated else [])
    val = cal.get("val") or {}
    return {"val_n": val.get("n", "?"), "val_ece_before": val.get("ece_before"), "val_ece_after": val.get("ece_after"),
            "warning": cal.get("warning"), "uri": figure_to_data_uri(plot_reliability(y, panels))}


def _abstention(a: dict) -> dict | None:
    """Threshold, target precision and test coverage/precision at it; None without a threshold."""
    if not a.get("threshold"):
        return None
    test = a.get("test") or {}
    return {"threshold": float(a["threshold"]), "target_precision": a.get("target_precision"),
            "coverage": test.get("coverage"), "precision": test.get("precision")}


def _gallery(paths: list[str], y: np.ndarray, probs: np.ndarray, classes: list[str], limit: int) -> dict:
    """Misclassified images, most confident mistakes first; ``uri`` None for an unreadable image."""
    y_pred = probs.argmax(1)
    wrong = np.nonzero(y_pred != y)[0]
    shown = wrong[np.argsort(-probs[wrong, y_pred[wrong]], kind="stable")][:limit]
    tiles = [{"uri": thumbnail_uri(paths[i]), "alt": Path(paths[i]).name, "true": classes[y[i]],
              "p_true": float(probs[i, y[i]]), "predicted": classes[y_pred[i]],
              "confidence": float(probs[i, y_pred[i]])} for i in shown]
    return {"wrong": len(wrong), "tiles": tiles, "truncated": len(wrong) > len(shown)}
