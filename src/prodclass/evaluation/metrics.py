"""Evaluation on the test split: headline metrics, per-class table, confusion matrix.

Metrics are scikit-learn's (``accuracy_score``, ``precision_recall_fscore_support``,
``top_k_accuracy_score``, ``log_loss``); this module only chooses and arranges them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from prodclass.io import save_figure


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str], top_k: int = 5) -> dict:
    """Headline metrics of predicted class probabilities.

    Args:
        y_true: int ``(N,)`` true class ids.
        probs: float ``(N, C)`` class probabilities (rows sum to 1).
        classes: the C class names.
        top_k: k for top-k accuracy (clipped to C).

    Returns:
        ``accuracy, top{k}_accuracy, macro_precision, macro_recall, macro_f1,
        weighted_precision, weighted_recall, weighted_f1, log_loss, n``.
    """
    labels = np.arange(len(classes))
    y_pred = probs.argmax(1)
    out = {"n": int(len(y_true)), "accuracy": float(skm.accuracy_score(y_true, y_pred))}
    k = min(top_k, len(classes) - 1)
    if k >= 1 and len(classes) > 2:
        out[f"top{top_k}_accuracy"] = float(skm.top_k_accuracy_score(y_true, probs, k=k, labels=labels))
    for avg in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        out.update({f"{avg}_precision": float(p), f"{avg}_recall": float(r), f"{avg}_f1": float(f)})
    out["log_loss"] = float(skm.log_loss(y_true, np.clip(probs, 1e-12, 1), labels=labels))
    return out


def per_class_table(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Per-class precision, recall, F1 and support, sorted worst F1 first."""
    p, r, f, s = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(len(classes)), zero_division=0
    )
    t = pd.DataFrame({"class": classes, "precision": p, "recall": r, "f1": f, "support": s})
    return t.sort_values(["f1", "support"], ascending=[True, False]).reset_index(drop=True)


def plot_confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], path: str | Path) -> None:
    """Row-normalised confusion matrix (recall on the diagonal), readable up to ~150 classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    cm = skm.confusion_matrix(y_true, y_pred, labels=np.arange(n), normalize="true")
    side = min(28, max(6, 0.22 * n + 2))
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    fs = max(4, min(9, 300 // max(n, 1)))
    ax.set_xticks(range(n), classes, rotation=90, fontsize=fs)
    ax.set_yticks(range(n), classes, fontsize=fs)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 40:
        for i, j in zip(*np.nonzero(cm >= 0.01)):
            ax.text(j, i, f"{cm[i, j]:.2f}"[1:] if cm[i, j] < 1 else "1", ha="center", va="center",
                    fontsize=fs - 1, color="white" if cm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.03)
    ax.set_title("Confusion matrix (row-normalised)")
    fig.tight_layout()
    save_figure(path, fig, dpi=100)


def format_table(t: pd.DataFrame, max_rows: int = 15) -> str:
    """Plain-text rendering of a per-class table (worst first)."""
    return t.head(max_rows).to_string(index=False, float_format=lambda v: f"{v:.3f}")
