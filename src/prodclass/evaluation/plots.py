"""Every figure prodclass draws, and images as ``data:`` URIs for the self-contained report.

Each ``plot_*`` function takes arrays (or a small table) and returns a matplotlib
:class:`~matplotlib.figure.Figure`; callers save it (``RunDir.write_figure``) or embed it
(:func:`figure_to_data_uri`). Figures are built with ``matplotlib.figure.Figure`` directly, not
pyplot: no global figure registry, no GUI backend, nothing to close, safe in a server thread.

Curves and matrices are scikit-learn's (``roc_curve``, ``precision_recall_curve``,
``confusion_matrix``); reliability bins and ECE are :mod:`prodclass.evaluation.calibration`'s
(Guo et al. 2017).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from sklearn import metrics as skm

from prodclass.evaluation.calibration import N_BINS, expected_calibration_error, reliability_bins
from prodclass.evaluation.metrics import stage_spans


def figure_to_data_uri(fig: Figure, dpi: int = 90) -> str:
    """A figure as a ``data:image/png;base64,...`` URI (tight bounding box, ``dpi`` dots per inch)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def thumbnail_uri(path: str | Path, size: int = 112, quality: int = 70) -> str | None:
    """A small JPEG ``data:`` URI of an image file (longest side ``size`` px, JPEG ``quality``),
    or None if the file is missing or cannot be decoded."""
    from prodclass.preprocess import ImageError, load_image

    try:
        img = load_image(str(path))
    except (ImageError, OSError):
        return None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def plot_training_curves(history: list[dict]) -> Figure:
    """Loss and accuracy per epoch, train vs validation (two panels).

    Args:
        history: one dict per epoch with ``train_loss, val_loss, train_acc, val_acc`` and
            optionally ``stage`` and ``best`` (missing values are not drawn).

    Stage changes are dashed vertical lines with the stage names on top, the kept (best) epoch of
    each stage a star; x counts epochs across all stages (1-based).
    """
    fig = Figure(figsize=(11, 3.6))
    axes = fig.subplots(1, 2)
    x = np.arange(1, len(history) + 1)
    best = [i for i, h in enumerate(history) if h.get("best")]
    for ax, key, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "acc", "accuracy")):
        for split, name in (("train", "train"), ("val", "validation")):
            ax.plot(x, [h.get(f"{split}_{key}", np.nan) for h in history], "-", label=name, lw=1.5)
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


def plot_confusion(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], rows: list[int] | None = None,
                   title: str | None = None) -> Figure:
    """Row-normalised confusion matrix (share of each true class; recall on the diagonal).

    Args:
        y_true, y_pred: int ``(N,)`` true and predicted class ids.
        classes: the C class names.
        rows: show only these class ids (rows and columns; shares stay relative to the whole true
            class), for a zoom on the most confused classes. None: all classes.
        title: optional axes title.

    Readable from 2 to ~150 classes: the figure grows 0.15 in per class with 6–8 pt labels, a
    square-root colour scale keeps 2–5 % confusions visible, values are printed when there are at
    most 40 columns, and guide lines mark every 10th class beyond that.
    """
    n = len(classes)
    cm = skm.confusion_matrix(y_true, y_pred, labels=np.arange(n), normalize="true")
    idx = np.arange(n) if rows is None else np.asarray(rows)
    cm, names = cm[np.ix_(idx, idx)], [classes[i] for i in idx]
    m = len(idx)
    side = min(30, max(5, 0.15 * m + 3))
    fs = 8 if m <= 40 else 6
    fig = Figure(figsize=(side, side))
    ax = fig.subplots()
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
        for i, j in zip(*np.nonzero(cm >= 0.01), strict=True):
            ax.text(j, i, f"{cm[i, j]:.2f}".lstrip("0") if cm[i, j] < 1 else "1", ha="center", va="center",
                    fontsize=fs - 1, color="white" if cm[i, j] > 0.45 else "black")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    return fig


def plot_roc_pr(y_true: np.ndarray, probs: np.ndarray, classes: list[str], per_class: pd.DataFrame,
                summary: dict, worst: int = 5) -> Figure:
    """One-vs-rest ROC (left) and precision-recall (right) curves, scikit-learn's.

    Args:
        y_true: int ``(N,)`` class ids. probs: float ``(N, C)`` (calibrated) probabilities.
        classes: the C class names.
        per_class: :func:`prodclass.evaluation.metrics.ovr_metrics`' ``per_class`` table.
        summary: has ``roc_auc_micro, roc_auc_macro, average_precision_micro,
            average_precision_macro`` (for the legend).
        worst: how many classes with the lowest AUC / AP get their own curve.

    Micro pools all (image, class) decisions; macro ROC averages per-class TPR on a common FPR
    grid; macro PR averages per-class interpolated precision (max precision at recall ≥ r).
    Classes with no positive or no negative image are left out.
    """
    Y = np.eye(len(classes), dtype=np.int8)[y_true]
    valid = [c for c in range(len(classes)) if 0 < Y[:, c].sum() < len(Y)]
    roc = {c: skm.roc_curve(Y[:, c], probs[:, c])[:2] for c in valid}  # (fpr, tpr)
    pr = {c: skm.precision_recall_curve(Y[:, c], probs[:, c])[:2] for c in valid}  # (precision, recall)
    grid = np.linspace(0, 1, 201)
    fig = Figure(figsize=(11, 4.6))
    ax1, ax2 = fig.subplots(1, 2)

    fpr, tpr, _ = skm.roc_curve(Y.ravel(), probs.ravel())
    ax1.plot(fpr, tpr, lw=2.2, color="black", label=f"micro-average (AUC {summary['roc_auc_micro']:.3f})")
    if valid:
        macro_tpr = np.mean([np.interp(grid, *roc[c]) for c in valid], axis=0)
        ax1.plot(grid, macro_tpr, lw=2.2, color="tab:blue", label=f"macro-average (AUC {summary['roc_auc_macro']:.3f})")
    p, r, _ = skm.precision_recall_curve(Y.ravel(), probs.ravel())
    ax2.plot(r, p, lw=2.2, color="black", label=f"micro-average (AP {summary['average_precision_micro']:.3f})")
    if valid:
        interp = [np.interp(grid, pr[c][1][::-1], np.maximum.accumulate(pr[c][0])[::-1]) for c in valid]
        ax2.plot(grid, np.mean(interp, axis=0), lw=2.2, color="tab:blue",
                 label=f"macro-average (AP {summary['average_precision_macro']:.3f})")

    pc = per_class.set_index("class")
    for col, ax, curves in (("roc_auc", ax1, roc), ("average_precision", ax2, pr)):
        for name, v in pc[col].dropna().sort_values().head(worst).items():
            a, b = curves[classes.index(name)]
            ax.plot(*((a, b) if col == "roc_auc" else (b, a)), lw=1, alpha=0.8, label=f"{name} ({v:.3f})")
    ax1.plot([0, 1], [0, 1], ":", color="grey")
    ax1.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (one-vs-rest)")
    ax2.set(xlabel="recall", ylabel="precision", title="Precision-recall (one-vs-rest)", ylim=(0, 1.02))
    for ax, loc in ((ax1, "lower right"), (ax2, "lower left")):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc=loc)
    fig.tight_layout()
    return fig


def plot_reliability(y_true: np.ndarray, panels: list[tuple[str, np.ndarray]], n_bins: int = N_BINS) -> Figure:
    """Reliability diagrams (Guo et al. 2017, fig. 1), one panel per ``(title, probs)``.

    Args:
        y_true: int ``(N,)`` class ids.
        panels: ``(title, float (N, C) probabilities)`` pairs, e.g. before and after temperature scaling.
        n_bins: equal-width top-1 confidence bins (15 as in the paper).

    Per bin: accuracy (blue bars) against the diagonal, the gap to mean confidence hatched red,
    the share of images in the bin (orange, right axis); the panel title gives its ECE.
    """
    fig = Figure(figsize=(4.6 * len(panels), 4.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, probs) in zip(axes, panels, strict=True):
        b = reliability_bins(probs, y_true, n_bins)
        w, left = 1 / n_bins, b["edges"][:-1]
        acc, conf = np.nan_to_num(b["accuracy"]), np.nan_to_num(b["confidence"])
        ax.bar(left, acc, width=w, align="edge", color="tab:blue", edgecolor="black", lw=0.5, label="accuracy")
        ax.bar(left, conf - acc, bottom=acc, width=w, align="edge", fill=False, edgecolor="tab:red", lw=0.6,
               hatch="///", label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "--", color="grey")
        share = ax.twinx()
        share.plot(left + w / 2, b["count"] / max(1, b["count"].sum()), "o-", color="tab:orange", ms=3, lw=1)
        share.set_ylim(0, 1)
        share.set_ylabel("share of images (orange)", fontsize=8)
        ece = expected_calibration_error(probs, y_true, n_bins)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="top-1 confidence", ylabel="accuracy", title=f"{title}\nECE {ece:.4f}")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def plot_class_counts(counts: pd.DataFrame, max_classes: int = 60) -> Figure:
    """Horizontal bars of images per class before (raw label) and after curation.

    Args:
        counts: one row per label with columns ``label, raw, curated`` (the run's class counts).
        max_classes: show the ``max_classes`` largest classes (after curation, then raw); the
            title says when some were left out.
    """
    c = counts.sort_values(["curated", "raw"], ascending=False).head(max_classes).iloc[::-1]
    fig = Figure(figsize=(8, max(3, 0.22 * len(c) + 1)))
    ax = fig.subplots()
    y = np.arange(len(c))
    ax.barh(y + 0.2, c["raw"], height=0.4, label="before (raw label)", color="#bbbbbb")
    ax.barh(y - 0.2, c["curated"], height=0.4, label="after curation", color="#1f77b4")
    ax.set_yticks(y, c["label"].astype(str), fontsize=7)
    ax.set_xlabel("images")
    more = len(counts) - len(c)
    ax.set_title(f"Images per class ({len(counts)} labels" + (f", top {len(c)} shown)" if more else ")"))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
