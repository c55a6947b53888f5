"""The run report: one self-contained ``report.html`` a person reads, and ``metrics.json`` extended.

:func:`write_report` reads only the run directory (config, class counts, history, test
predictions, ``calibration.json``) and writes a single HTML page whose images are embedded as
data URIs (plots as PNG, thumbnails as small JPEG), so it opens offline and can be mailed or
archived alone. Sections, in page order: headline figures, dataset, training curves, overall
metrics, per-class table (worst first), confusion matrix and top confused pairs, one-vs-rest
ROC/PR curves, reliability diagram, misclassified test images (most confident mistakes first).

Metrics are scikit-learn's (``roc_curve``, ``precision_recall_curve``, ``roc_auc_score``,
``average_precision_score``, ``confusion_matrix``); ECE and temperature scaling come from
:mod:`prodclass.evaluation.calibration`. :func:`compare_runs` puts the headline metrics of several runs in
one table (``prodclass compare``).
"""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn import metrics as skm

from prodclass.evaluation.calibration import N_BINS, expected_calibration_error, nll, reliability_bins, softmax
from prodclass.io import read_json, write_dataframe, write_json, write_text

SECTIONS = {"dataset": "Dataset", "training": "Training curves", "metrics": "Overall metrics",
            "per-class": "Per-class results", "confusion": "Confusion matrix", "roc-pr": "ROC and PR curves",
            "calibration": "Calibration", "errors": "Misclassified test images"}


# ---------------------------------------------------------------------------------------- metrics

def ovr_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """One-vs-rest ROC AUC and average precision, per class and averaged.

    Args:
        y_true: int ``(N,)`` class ids. probs: float ``(N, C)`` class probabilities.
        classes: the C class names.

    Returns:
        ``roc_auc_micro, roc_auc_macro, average_precision_micro, average_precision_macro`` and
        ``per_class`` (DataFrame ``class, roc_auc, average_precision``; NaN for a class with no
        positive or no negative test image). Macro = unweighted mean over the classes that have
        a value, which equals ``roc_auc_score(..., multi_class="ovr", average="macro")`` when all
        classes occur; micro pools all (image, class) decisions.
    """
    Y = np.eye(len(classes), dtype=np.int8)[y_true]
    auc, ap = np.full(len(classes), np.nan), np.full(len(classes), np.nan)
    for c in range(len(classes)):
        if 0 < Y[:, c].sum() < len(Y):
            auc[c] = skm.roc_auc_score(Y[:, c], probs[:, c])
            ap[c] = skm.average_precision_score(Y[:, c], probs[:, c])
    return {
        "roc_auc_micro": float(skm.roc_auc_score(Y, probs, average="micro")),
        "roc_auc_macro": float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan"),
        "average_precision_micro": float(skm.average_precision_score(Y, probs, average="micro")),
        "average_precision_macro": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
        "per_class": pd.DataFrame({"class": classes, "roc_auc": auc, "average_precision": ap}),
    }


def confused_pairs(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], k: int = 15) -> pd.DataFrame:
    """The ``k`` most frequent (true → predicted) mistakes.

    Returns:
        DataFrame ``true, predicted, count, share`` (share = count / test images of the true
        class), most frequent first; ties broken by share.
    """
    n = len(classes)
    cm = skm.confusion_matrix(y_true, y_pred, labels=np.arange(n))
    np.fill_diagonal(cm, 0)
    support = np.bincount(y_true, minlength=n)
    i, j = np.nonzero(cm)
    t = pd.DataFrame({"true": [classes[a] for a in i], "predicted": [classes[b] for b in j],
                      "count": cm[i, j], "share": cm[i, j] / support[i]})
    return t.sort_values(["count", "share"], ascending=False).head(k).reset_index(drop=True)


def stage_spans(history: list[dict]) -> list[tuple[str, int, int]]:
    """Consecutive runs of one ``stage`` in a training history: ``(stage, first, last)`` positions
    (1-based, counting epochs across all stages), e.g. ``[("head", 1, 20), ("finetune", 21, 30)]``."""
    spans: list[tuple[str, int, int]] = []
    for i, h in enumerate(history, 1):
        stage = str(h.get("stage", "head"))
        if spans and spans[-1][0] == stage:
            spans[-1] = (stage, spans[-1][1], i)
        else:
            spans.append((stage, i, i))
    return spans


# ------------------------------------------------------------------------------------------ plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png_uri(fig, dpi: int = 90) -> str:
    """A matplotlib figure as a ``data:image/png;base64`` URI (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def plot_training_curves(history: list[dict]):
    """Loss and accuracy per epoch, train vs validation; stage changes as dashed lines, the
    kept (best) epoch of each stage as a star. x counts epochs across all stages."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    x = np.arange(1, len(history) + 1)
    for ax, key, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "acc", "accuracy")):
        for split, style in (("train", "-"), ("val", "-")):
            vals = [h.get(f"{split}_{key}", np.nan) for h in history]
            ax.plot(x, vals, style, label="train" if split == "train" else "validation", lw=1.5)
        best = [i for i, h in enumerate(history) if h.get("best")]
        ax.plot(x[best], [history[i].get(f"val_{key}", np.nan) for i in best], "k*", ms=10, label="kept epoch")
        for stage, first, last in stage_spans(history):
            if first > 1:
                ax.axvline(first - 0.5, color="grey", ls="--", lw=1)
            ax.text((first + last) / 2, 1.01, stage, transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=8, color="dimgrey")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_confusion(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], rows: list[int] | None = None):
    """Row-normalised confusion matrix (share of each true class; recall on the diagonal).

    Readable from 2 to ~150 classes: the figure grows 0.15 in per class with 6–8 pt labels, a
    square-root colour scale keeps 2–5 % confusions visible, and values are printed when there
    are at most 40 columns. ``rows``: show only these classes (rows and columns; shares still
    relative to the whole true class), for a zoom on the most confused ones.
    """
    plt = _plt()
    from matplotlib.colors import PowerNorm

    n = len(classes)
    cm = skm.confusion_matrix(y_true, y_pred, labels=np.arange(n), normalize="true")
    idx = np.arange(n) if rows is None else np.asarray(rows)
    cm, names = cm[np.ix_(idx, idx)], [classes[i] for i in idx]
    m = len(idx)
    side = min(30, max(5, 0.15 * m + 3))
    fs = 8 if m <= 40 else 6
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(cm, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1))
    ax.set_xticks(range(m), names, rotation=90, fontsize=fs)
    ax.set_yticks(range(m), names, fontsize=fs)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if m > 40:  # guide lines every 10 classes
        ax.set_xticks(np.arange(9.5, m - 1, 10), minor=True)
        ax.set_yticks(np.arange(9.5, m - 1, 10), minor=True)
        ax.grid(which="minor", color="#c8ccd2", lw=0.5)
        ax.tick_params(which="minor", length=0)
    else:
        for i, j in zip(*np.nonzero(cm >= 0.01)):
            ax.text(j, i, f"{cm[i, j]:.2f}".lstrip("0") if cm[i, j] < 1 else "1", ha="center", va="center",
                    fontsize=fs - 1, color="white" if cm[i, j] > 0.45 else "black")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    return fig


def plot_roc_pr(y_true: np.ndarray, probs: np.ndarray, classes: list[str], per_class: pd.DataFrame,
                summary: dict, worst: int = 5):
    """One-vs-rest ROC and precision-recall curves: micro and macro averages plus the ``worst``
    classes by AUC / average precision. Macro ROC averages per-class TPR on a common FPR grid;
    macro PR averages per-class interpolated precision (max precision at recall ≥ r)."""
    plt = _plt()
    Y = np.eye(len(classes), dtype=np.int8)[y_true]
    valid = [c for c in range(len(classes)) if 0 < Y[:, c].sum() < len(Y)]
    grid = np.linspace(0, 1, 201)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    roc = {c: skm.roc_curve(Y[:, c], probs[:, c])[:2] for c in valid}
    pr = {c: skm.precision_recall_curve(Y[:, c], probs[:, c])[:2] for c in valid}
    fpr, tpr, _ = skm.roc_curve(Y.ravel(), probs.ravel())
    ax1.plot(fpr, tpr, lw=2.2, color="black", label=f"micro-average (AUC {summary['roc_auc_micro']:.3f})")
    macro_tpr = np.mean([np.interp(grid, *roc[c]) for c in valid], axis=0) if valid else grid * np.nan
    ax1.plot(grid, macro_tpr, lw=2.2, color="tab:blue", label=f"macro-average (AUC {summary['roc_auc_macro']:.3f})")
    p, r, _ = skm.precision_recall_curve(Y.ravel(), probs.ravel())
    ax2.plot(r, p, lw=2.2, color="black", label=f"micro-average (AP {summary['average_precision_micro']:.3f})")
    interp = [np.interp(grid, pr[c][1][::-1], np.maximum.accumulate(pr[c][0])[::-1]) for c in valid]
    if interp:
        ax2.plot(grid, np.mean(interp, axis=0), lw=2.2, color="tab:blue",
                 label=f"macro-average (AP {summary['average_precision_macro']:.3f})")
    pc = per_class.set_index("class")
    for col, ax, curves in (("roc_auc", ax1, roc), ("average_precision", ax2, pr)):
        for name, v in pc[col].dropna().sort_values().head(worst).items():
            c = classes.index(name)
            a, b = curves[c] if col == "roc_auc" else curves[c][::-1]
            ax.plot(a, b, lw=1, alpha=0.8, label=f"{name} ({v:.3f})")
    ax1.plot([0, 1], [0, 1], ":", color="grey")
    ax1.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (one-vs-rest)")
    ax2.set(xlabel="recall", ylabel="precision", title="Precision-recall (one-vs-rest)", ylim=(0, 1.02))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if ax is ax1 else "lower left")
    fig.tight_layout()
    return fig


def plot_reliability(y_true: np.ndarray, panels: list[tuple[str, np.ndarray]], n_bins: int = N_BINS):
    """Reliability diagrams (Guo et al. 2017, fig. 1): per confidence bin, accuracy (bars) against
    the diagonal, the gap to mean confidence in red; one panel per ``(title, (N, C) probs)``."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4), squeeze=False)
    for ax, (title, probs) in zip(axes[0], panels):
        b = reliability_bins(probs, y_true, n_bins)
        w, left = 1 / n_bins, b["edges"][:-1]
        acc, conf = np.nan_to_num(b["accuracy"]), np.nan_to_num(b["confidence"])
        ax.bar(left, acc, width=w, align="edge", color="tab:blue", edgecolor="black", lw=0.5, label="accuracy")
        ax.bar(left, conf - acc, bottom=acc, width=w, align="edge", fill=False, edgecolor="tab:red", lw=0.6,
               hatch="///", label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "--", color="grey")
        ax2 = ax.twinx()
        ax2.plot(left + w / 2, b["count"] / max(1, b["count"].sum()), "o-", color="tab:orange", ms=3, lw=1)
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("share of images (orange)", fontsize=8)
        ece = expected_calibration_error(probs, y_true, n_bins)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="top-1 confidence", ylabel="accuracy", title=f"{title}\nECE {ece:.4f}")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def thumbnail_uri(path: str | Path, size: int = 112, quality: int = 70) -> str | None:
    """A small JPEG ``data:`` URI of an image (longest side ``size`` px), or None if unreadable."""
    from prodclass.preprocess import ImageError, load_image

    try:
        img = load_image(str(path))
    except (ImageError, OSError):
        return None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


# ------------------------------------------------------------------------------------------- HTML

def _e(x) -> str:
    return html.escape(str(x))


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else _e(v)


def _table(df: pd.DataFrame, cls: str = "", bar: str | None = None, digits: int = 3) -> str:
    """An HTML table; ``bar`` names a [0, 1] column drawn as a background bar."""
    head = "".join(f"<th>{_e(c)}</th>" for c in df.columns)
    rows = []
    for _, r in df.iterrows():
        cells = []
        for c in df.columns:
            v = r[c]
            style = ""
            if c == bar and isinstance(v, (float, np.floating)) and np.isfinite(v):
                style = f' style="background:linear-gradient(90deg,#cfe3f5 {100 * v:.0f}%,transparent 0)"'
            cells.append(f"<td{style}>{_fmt(v, digits)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _img(uri: str, alt: str, wide: bool = False) -> str:
    return f'<img class="{"wide" if wide else "plot"}" src="{uri}" alt="{_e(alt)}">'


def _file_uri(path: Path) -> str | None:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode() if path.is_file() else None


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:16px 24px 48px}
header{background:#1d2330;color:#fff;padding:18px 24px}header h1{margin:0 0 4px;font-size:22px}
header .sub{color:#b8c0cc;font-size:13px}
nav{margin:10px 0 0;font-size:13px}nav a{color:#9cc7ff;margin-right:14px;text-decoration:none}
section{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:14px 20px;margin:16px 0}
h2{font-size:18px;margin:4px 0 10px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:10px 16px;min-width:130px}
.card .v{font-size:26px;font-weight:600}.card .k{color:#5b6472;font-size:12px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{padding:3px 9px;border-bottom:1px solid #eceef1;text-align:right}
th{background:#f0f2f5;position:sticky;top:0}td:first-child,th:first-child{text-align:left}
.scroll{max-height:460px;overflow:auto;border:1px solid #eceef1}
.scrollxy{max-height:900px;overflow:auto;border:1px solid #eceef1}
img.plot{max-width:100%}img.wide{max-width:none}
.note{color:#5b6472;font-size:12.5px}.row{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.tile{border:1px solid #e1e4e8;border-radius:6px;padding:6px;font-size:12px;background:#fafbfc;overflow-wrap:anywhere}
.tile img{width:100%;height:120px;object-fit:contain;background:#fff}
.tile .t{color:#1a7f37}.tile .p{color:#cf222e;font-weight:600}
.missing{height:120px;display:flex;align-items:center;justify-content:center;color:#999}
"""


def _calibration_html(y: np.ndarray, p_raw: np.ndarray, p_cal: np.ndarray, cal: dict, metrics: dict) -> str:
    """ECE before/after temperature scaling and the reliability diagrams."""
    t = float(cal.get("temperature", 1.0))
    val = cal.get("val", {})
    text = f"<p>ECE on the test split: <b>{metrics['ece_before']:.4f}</b> before"
    if cal:
        text += (f", <b>{metrics['ece_after']:.4f}</b> after temperature scaling (T = {t:.3f}, fitted by minimising "
                 f"NLL on {val.get('n', '?')} validation images; there ECE went {_fmt(val.get('ece_before'))} → "
                 f"{_fmt(val.get('ece_after'))}).</p>")
    else:
        text += " (no calibration.json in this run).</p>"
    if cal.get("warning"):
        text += f'<p class="note"><b>Warning:</b> {_e(cal["warning"])}.</p>'
    panels = [("uncalibrated (T = 1)", p_raw)] + ([(f"temperature scaled (T = {t:.3f})", p_cal)] if cal else [])
    return (text + _img(_png_uri(plot_reliability(y, panels)), "reliability diagram")
            + '<p class="note">Guo, Pleiss, Sun, Weinberger, "On Calibration of Modern Neural Networks", ICML 2017: '
              "ECE = Σ |B<sub>m</sub>|/n · |acc(B<sub>m</sub>) − conf(B<sub>m</sub>)| over 15 equal-width bins.</p>")


def _gallery_html(paths: list[str], y: np.ndarray, probs: np.ndarray, classes: list[str], limit: int) -> str:
    """Misclassified images, most confident mistakes first; an unreadable image gets a placeholder."""
    y_pred = probs.argmax(1)
    wrong = np.nonzero(y_pred != y)[0]
    shown = wrong[np.argsort(-probs[wrong, y_pred[wrong]], kind="stable")][:limit]
    tiles = []
    for i in shown:
        uri = thumbnail_uri(paths[i])
        pic = f'<img src="{uri}" alt="{_e(Path(paths[i]).name)}">' if uri else '<div class="missing">image missing</div>'
        tiles.append(f'<div class="tile">{pic}<div class="t">true: {_e(classes[y[i]])} ({probs[i, y[i]]:.2f})</div>'
                     f'<div class="p">predicted: {_e(classes[y_pred[i]])}</div>'
                     f"<div>confidence {probs[i, y_pred[i]]:.2f}</div></div>")
    which = f"the {len(shown)} shown are" if len(wrong) > len(shown) else "shown"
    return (f"<p>{len(wrong)} of {len(y)} test images misclassified; {which} most confident first "
            "(calibrated probabilities; the true label's probability in brackets).</p>"
            + (f'<div class="gallery">{"".join(tiles)}</div>' if tiles else "<p>No mistakes on the test split.</p>"))


def _abstention_html(a: dict) -> str:
    """One line on ``abstention.json`` (threshold, and test coverage/precision at it), if present."""
    if not a.get("threshold"):
        return ""
    t = a.get("test", {})
    return (f"<p>Abstention: predictions under top-1 probability <b>{a['threshold']:.3f}</b> go to review "
            f"(target precision {_fmt(a.get('target_precision'), 2)} on validation); on the test split "
            f"{_fmt(t.get('coverage'), 3)} of images are accepted, with precision {_fmt(t.get('precision'), 3)}.</p>")


def build_report(run_dir: str | Path, max_gallery: int = 60) -> tuple[str, dict]:
    """Compute the report's figures and render its HTML.

    Args:
        run_dir: a run directory (see :mod:`prodclass.runs`) with at least ``config.yaml``,
            ``class_map.json`` and ``predictions_test.parquet``.
        max_gallery: most misclassified images shown.

    Returns:
        ``(html, metrics)``: the page, and ``metrics.json``'s content (its other keys kept) with the
        headline metrics of :func:`prodclass.evaluation.metrics.classification_metrics` recomputed from
        ``predictions_test.parquet`` (T = 1) and ``temperature, ece_before, ece_after,
        log_loss_calibrated, roc_auc_micro, roc_auc_macro, average_precision_micro,
        average_precision_macro`` added (None where the run has no ``calibration.json``).

    Raises:
        FileNotFoundError: a required file is missing (the message names it).
    """
    from prodclass.evaluation.metrics import classification_metrics, per_class_table
    from prodclass.pipeline import load_predictions

    run_dir = Path(run_dir)
    for name in ("config.yaml", "class_map.json", "predictions_test.parquet"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name}: missing; is {run_dir} a complete prodclass run directory?")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    classes = read_json(run_dir / "class_map.json")["classes"]
    opt = lambda name: read_json(run_dir / name) if (run_dir / name).is_file() else {}  # noqa: E731
    metrics, cal, history = opt("metrics.json"), opt("calibration.json"), opt("history.json") or []
    table, logits = load_predictions(run_dir, "test")
    y = table["y_true"].to_numpy(np.int64)
    temp = float(cal.get("temperature", 1.0))
    p_raw, p_cal = softmax(logits), softmax(logits, temp)
    y_pred = p_cal.argmax(1)

    top_k = cfg.get("eval", {}).get("top_k", 5)
    metrics = {**metrics, **classification_metrics(y, p_raw, classes, top_k=top_k)}  # agree with the predictions
    ovr = ovr_metrics(y, p_cal, classes)
    metrics.update({
        "temperature": temp if cal else None,
        "ece_before": expected_calibration_error(p_raw, y),
        "ece_after": expected_calibration_error(p_cal, y) if cal else None,
        "log_loss_calibrated": nll(logits, y, temp) if cal else None,
        **{k: v for k, v in ovr.items() if k != "per_class"},
    })

    # per-class table: evaluate's precision/recall/F1 + AUC/AP + training images, worst F1 first
    per_class = per_class_table(y, y_pred, classes).merge(ovr["per_class"], on="class", how="left")
    counts = pd.read_csv(run_dir / "class_counts.csv") if (run_dir / "class_counts.csv").is_file() else None
    if counts is not None and "train" in counts:
        per_class = per_class.merge(counts[["label", "train"]].rename(columns={"label": "class", "train": "train images"}),
                                    on="class", how="left")
    pairs = confused_pairs(y, y_pred, classes)

    # ---- sections
    data, cur = cfg.get("data", {}), cfg.get("curation", {})
    model = cfg.get("model", {})
    title = f"{cfg.get('name', run_dir.name)} — {model.get('backbone', '?')} + {model.get('head', '?')} head"
    cards = [("test accuracy", metrics["accuracy"]), (f"top-{top_k} accuracy", metrics.get(f"top{top_k}_accuracy")),
             ("macro F1", metrics["macro_f1"]), ("ROC AUC (macro)", metrics["roc_auc_macro"]),
             ("ECE before → after temperature" if cal else "ECE (uncalibrated)",
              f"{metrics['ece_before']:.3f} → {metrics['ece_after']:.3f}" if cal else metrics["ece_before"]),
             ("classes / test images", f"{len(classes)} / {len(y)}")]
    cards_html = "".join(f'<div class="card"><div class="v">{_fmt(v, 3)}</div><div class="k">{_e(k)}</div></div>'
                         for k, v in cards)
    errors = int((y_pred != y).sum())
    worst = per_class.head(3)["class"].tolist()
    lead = (f"{len(y)} held-out test images of {len(classes)} classes; {errors} misclassified. "
            f"Weakest classes: {', '.join(map(_e, worst))}. "
            + (f"Temperature scaling (T = {temp:.3f}, fitted on the validation split) moves ECE from "
               f"{metrics['ece_before']:.4f} to {metrics['ece_after']:.4f}." if cal else
               "No calibration.json: probabilities are uncalibrated (T = 1)."))

    rules = [f"source <code>{_e(data.get('source'))}</code>: {_e(data.get('path'))}"
             + (f" (images: {_e(data['image_dir'])})" if data.get("image_dir") else "")
             + f", label column <code>{_e(data.get('label'))}</code>"]
    if cur.get("merge"):
        rules.append("merge: " + ", ".join(f"{_e(a)} → {_e(b)}" for a, b in cur["merge"].items()))
    if cur.get("drop"):
        rules.append("drop: " + ", ".join(map(_e, cur["drop"])))
    fr = cur.get("split") or {}
    rules.append(f"main images only: {cur.get('main_images_only')}; min per class: {cur.get('min_per_class')}; "
                 f"max per class: {cur.get('max_per_class')}; split by item, stratified: "
                 + " / ".join(f"{k} {v}" for k, v in fr.items()) + f" (seed {cur.get('seed')})")
    split_rows = []
    ds = run_dir / "dataset.parquet"
    if ds.is_file():
        d = pd.read_parquet(ds, columns=["label", "split"])
        for s in ("train", "val", "test"):
            part = d[d["split"] == s]
            split_rows.append({"split": s, "images": len(part), "classes": part["label"].nunique()})
    dataset_html = "<ul>" + "".join(f"<li>{r}</li>" for r in rules) + "</ul>"
    if counts is not None:
        raw, kept = counts["raw"], counts["curated"]
        dataset_html += (f"<p>Before curation: {int(raw.sum())} images with {int((raw > 0).sum())} labels. "
                         f"After: {int(kept.sum())} images in {int((kept > 0).sum())} classes.</p>")
    row = _table(pd.DataFrame(split_rows)) if split_rows else ""
    cc = _file_uri(run_dir / "class_counts.png")
    chart = f'<div class="scroll">{_img(cc, "images per class before/after curation")}</div>' if cc else ""
    dataset_html += f'<div class="row"><div>{row}</div>{chart}</div>'

    if history:
        best = [h for h in history if h.get("best")]
        spans = ", ".join(f"{s} (epochs {a}–{b})" for s, a, b in stage_spans(history))
        training_html = (f"<p>{len(history)} epochs: {_e(spans)}. Kept epoch(s): "
                         + ", ".join(f"{_e(h.get('stage', 'head'))} {h['epoch']} (val loss {h['val_loss']:.4f}, "
                                     f"val accuracy {h['val_acc']:.4f})" for h in best)
                         + "</p>" + _img(_png_uri(plot_training_curves(history)), "training curves"))
    else:
        training_html = '<p class="note">No history.json in this run.</p>'

    mrows = [("accuracy", metrics["accuracy"]), (f"top-{top_k} accuracy", metrics.get(f"top{top_k}_accuracy"))]
    mrows += [(f"{a} {b}", metrics.get(f"{a}_{b}")) for a in ("macro", "weighted") for b in ("precision", "recall", "f1")]
    mrows += [("log loss (T = 1)", metrics["log_loss"]), (f"log loss (T = {temp:.3f})", metrics["log_loss_calibrated"]),
              ("ECE, 15 bins (T = 1)", metrics["ece_before"]), (f"ECE, 15 bins (T = {temp:.3f})", metrics["ece_after"]),
              ("ROC AUC micro / macro", f"{metrics['roc_auc_micro']:.4f} / {metrics['roc_auc_macro']:.4f}"),
              ("average precision micro / macro",
               f"{metrics['average_precision_micro']:.4f} / {metrics['average_precision_macro']:.4f}")]
    metrics_html = (_table(pd.DataFrame(mrows, columns=["metric", "value"]), digits=4)
                    + f'<p class="note">{len(y)} test images. Precision/recall/F1, log loss, top-k: scikit-learn. '
                      "ECE: 15 equal-width top-label bins (Guo et al. 2017). "
                      "ROC/PR values use the calibrated probabilities.</p>")

    per_class_html = ('<div class="scroll">' + _table(per_class, bar="f1") + "</div>"
                      '<p class="note">Sorted by F1, worst first; ROC AUC / AP one-vs-rest on the test split.</p>')

    n = len(classes)
    cm_fig = _img(_png_uri(plot_confusion(y, y_pred, classes), dpi=100), "confusion matrix", wide=n > 40)
    confusion_html = f'<div class="{"scrollxy" if n > 40 else ""}">{cm_fig}</div>'
    if len(pairs):
        confusion_html += "<h3>Top confused pairs</h3>" + _table(pairs.rename(columns={"share": "share of true class"}))
        if n > 15:
            zoom = sorted({classes.index(c) for c in pd.concat([pairs["true"], pairs["predicted"]])})
            confusion_html += ("<h3>Zoom: classes in the top confused pairs</h3>"
                               + _img(_png_uri(plot_confusion(y, y_pred, classes, rows=zoom)), "confusion zoom"))
    confusion_html += ('<p class="note">Rows: true class, normalised to 1 (the diagonal is recall). '
                       "Square-root colour scale.</p>")

    roc_html = _img(_png_uri(plot_roc_pr(y, p_cal, classes, ovr["per_class"], metrics)), "ROC and PR curves")

    cal_html = _calibration_html(y, p_raw, p_cal, cal, metrics) + _abstention_html(opt("abstention.json"))
    errors_html = _gallery_html(table["image_path"].tolist(), y, p_cal, classes, max_gallery)

    body = {"dataset": dataset_html, "training": training_html, "metrics": metrics_html, "per-class": per_class_html,
            "confusion": confusion_html, "roc-pr": roc_html, "calibration": cal_html, "errors": errors_html}
    nav = "".join(f'<a href="#{k}">{v}</a>' for k, v in SECTIONS.items())
    versions = opt("versions.json")
    footer = (f"Generated {time.strftime('%Y-%m-%d %H:%M')} by prodclass {_e(versions.get('prodclass', ''))} "
              f"from {_e(run_dir.name)}; torch {_e(versions.get('torch', '?'))}, timm {_e(versions.get('timm', '?'))}, "
              f"scikit-learn {_e(versions.get('scikit-learn', '?'))}.")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head><body>'
            f'<header><h1>{_e(title)}</h1><div class="sub">{_e(run_dir.name)}</div><nav>{nav}</nav></header><main>'
            f'<section id="summary"><div class="cards">{cards_html}</div><p>{lead}</p></section>'
            + "".join(f'<section id="{k}"><h2>{SECTIONS[k]}</h2>{body[k]}</section>' for k in SECTIONS)
            + f'<p class="note">{footer}</p></main></body></html>')
    return page, metrics


def write_report(run_dir: str | Path, max_gallery: int = 60) -> dict:
    """Write ``report.html`` and the extended ``metrics.json`` into ``run_dir`` (both atomically).

    Returns:
        The metrics dict written (see :func:`build_report`).

    Raises:
        FileNotFoundError: the run directory lacks a file the report needs.
    """
    page, metrics = build_report(run_dir, max_gallery=max_gallery)
    metrics["report"] = "report.html"
    write_text(Path(run_dir) / "report.html", page)
    write_json(Path(run_dir) / "metrics.json", metrics)
    return metrics


# ---------------------------------------------------------------------------------------- compare

COMPARE_COLUMNS = {"accuracy": "accuracy", "top5_accuracy": "top-5", "macro_f1": "macro F1",
                   "weighted_f1": "weighted F1", "log_loss": "log loss", "ece_before": "ECE",
                   "ece_after": "ECE (T)", "roc_auc_macro": "ROC AUC macro", "average_precision_macro": "AP macro"}


def compare_runs(run_dirs: list[str | Path]) -> pd.DataFrame:
    """Headline test metrics of several runs, one row each (missing values are NaN).

    Columns: ``run, backbone, head, classes, test images`` and :data:`COMPARE_COLUMNS`' labels.

    Raises:
        FileNotFoundError: a directory without ``metrics.json`` (the message names it).
    """
    rows = []
    for d in map(Path, run_dirs):
        if not (d / "metrics.json").is_file():
            raise FileNotFoundError(f"{d / 'metrics.json'}: missing; is {d} a prodclass run directory?")
        m = read_json(d / "metrics.json")
        cfg = yaml.safe_load((d / "config.yaml").read_text(encoding="utf-8")) if (d / "config.yaml").is_file() else {}
        model = (cfg or {}).get("model", {})
        row = {"run": d.name, "backbone": model.get("backbone"), "head": model.get("head"),
               "classes": m.get("num_classes"), "test images": m.get("n")}
        row.update({label: m.get(key) for key, label in COMPARE_COLUMNS.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(df: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table (floats to ``digits`` places, missing as ``–``)."""
    cells = [[_md(v, digits) for v in r] for r in df.itertuples(index=False)]
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in df.columns) + "|"
    return "\n".join([head, sep] + ["| " + " | ".join(r) + " |" for r in cells]) + "\n"


def _md(v, digits: int) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v).replace("|", "\\|")


def write_comparison(df: pd.DataFrame, path: str | Path) -> None:
    """Write a :func:`compare_runs` table as Markdown (``.md``) or CSV (``.csv``).

    Raises:
        ValueError: another suffix.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".md":
        write_text(path, markdown_table(df))
    elif suffix == ".csv":
        write_dataframe(path, df)
    else:
        raise ValueError(f"{path}: unsupported table format {suffix!r} (use .md or .csv)")
