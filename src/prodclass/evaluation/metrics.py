"""Evaluation numbers: every metric of the test split, computed from arrays, returned as values.

Owns the headline test metrics (:func:`test_metrics`, what the pipeline stores as the run's
metrics), the per-class table, one-vs-rest ROC/PR summaries, the most confused class pairs and
the stage spans of a training history. Nothing here plots, renders or touches a file.

Metrics are scikit-learn's (``accuracy_score``, ``precision_recall_fscore_support``,
``top_k_accuracy_score``, ``log_loss``, ``roc_auc_score``, ``average_precision_score``,
``confusion_matrix``); this module only chooses and arranges them. ECE and the NLL under a
temperature come from :mod:`prodclass.evaluation.calibration` (Guo et al. 2017), probabilities
from :func:`prodclass.inference.softmax`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from prodclass.evaluation.calibration import expected_calibration_error, nll
from prodclass.inference import softmax

# The keys test_metrics() adds to classification_metrics()' (render_report needs them all).
CALIBRATION_KEYS = ("temperature", "ece_before", "ece_after", "log_loss_calibrated")
OVR_KEYS = ("roc_auc_micro", "roc_auc_macro", "average_precision_micro", "average_precision_macro")


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str], top_k: int = 5) -> dict:
    """Headline metrics of predicted class probabilities.

    Args:
        y_true: int ``(N,)`` true class ids.
        probs: float ``(N, C)`` class probabilities (rows sum to 1).
        classes: the C class names.
        top_k: k for top-k accuracy (clipped to C - 1; the key is absent for C <= 2).

    Returns:
        ``accuracy, top{k}_accuracy, macro_precision, macro_recall, macro_f1,
        weighted_precision, weighted_recall, weighted_f1, log_loss`` (nats), ``n``.
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


def test_metrics(y_true: np.ndarray, logits: np.ndarray, classes: list[str], temperature: float | None,
                 top_k: int) -> dict:
    """Every headline number of the test split, as the run stores them.

    Args:
        y_true: int ``(N,)`` test class ids.
        logits: float ``(N, C)`` test logits.
        classes: the C class names.
        temperature: the run's fitted temperature T (temperature scaling, Guo et al. 2017), or
            None when the run has no calibration (then T = 1 for the ROC/PR figures).
        top_k: k for top-k accuracy (``cfg.eval.top_k``).

    Returns:
        :func:`classification_metrics` of the *uncalibrated* probabilities ``softmax(logits)``,
        plus ``temperature`` (None without calibration), ``ece_before`` (15-bin top-label ECE at
        T = 1), ``ece_after`` and ``log_loss_calibrated`` (at T; None without calibration) and
        :func:`ovr_metrics`' ``roc_auc_micro, roc_auc_macro, average_precision_micro,
        average_precision_macro`` of the *calibrated* probabilities ``softmax(logits / T)``
        (T never changes the ranking within a class, so only ties can move them).

    Raises:
        ValueError: ``logits`` is not ``(N, C)`` with N = ``len(y_true)`` and C = ``len(classes)``,
            or N = 0.
    """
    y_true, logits = np.asarray(y_true, np.int64), np.asarray(logits)
    if logits.ndim != 2 or logits.shape != (len(y_true), len(classes)) or len(y_true) == 0:
        raise ValueError(f"need (N, C) logits with N = {len(y_true)} labels and C = {len(classes)} classes, "
                         f"N > 0; got logits {logits.shape}")
    calibrated = temperature is not None
    t = float(temperature) if calibrated else 1.0
    p_raw = softmax(logits)
    p_cal = softmax(logits, t) if calibrated else p_raw
    out = classification_metrics(y_true, p_raw, classes, top_k=top_k)
    ovr = ovr_metrics(y_true, p_cal, classes)
    out.update({
        "temperature": t if calibrated else None,
        "ece_before": expected_calibration_error(p_raw, y_true),
        "ece_after": expected_calibration_error(p_cal, y_true) if calibrated else None,
        "log_loss_calibrated": nll(logits, y_true, t) if calibrated else None,
        **{k: ovr[k] for k in OVR_KEYS},
    })
    return out


test_metrics.__test__ = False  # a library function named test_*: pytest must not collect it where imported


def per_class_table(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Per-class precision, recall, F1 and support of int ``(N,)`` labels and predictions.

    Returns:
        DataFrame ``class, precision, recall, f1, support``, worst F1 first (ties: larger class first).
    """
    p, r, f, s = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(len(classes)), zero_division=0
    )
    t = pd.DataFrame({"class": classes, "precision": p, "recall": r, "f1": f, "support": s})
    return t.sort_values(["f1", "support"], ascending=[True, False]).reset_index(drop=True)


def ovr_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """One-vs-rest ROC AUC and average precision (scikit-learn), per class and averaged.

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
    """The ``k`` most frequent (true → predicted) mistakes of int ``(N,)`` labels and predictions.

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
    (1-based, counting epochs across all stages), e.g. ``[("head", 1, 20), ("finetune", 21, 30)]``.
    An entry without ``stage`` counts as ``head``."""
    spans: list[tuple[str, int, int]] = []
    for i, h in enumerate(history, 1):
        stage = str(h.get("stage", "head"))
        if spans and spans[-1][0] == stage:
            spans[-1] = (stage, spans[-1][1], i)
        else:
            spans.append((stage, i, i))
    return spans


def format_table(t: pd.DataFrame, max_rows: int = 15) -> str:
    """Plain-text rendering of a per-class table (worst first), for the terminal."""
    return t.head(max_rows).to_string(index=False, float_format=lambda v: f"{v:.3f}")
