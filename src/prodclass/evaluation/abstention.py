"""Abstention: a confidence threshold that sends doubtful predictions to a human.

A prediction is *accepted* when its calibrated top-1 probability is ``>= threshold``; the rest
abstain (``Prediction.abstain``, ``prodclass predict --review-out``). The threshold is chosen on
the validation split as the lowest confidence at which the accepted predictions still reach the
target precision, i.e. the largest coverage meeting the target on the empirical
risk-coverage curve (selective classification, Geifman & El-Yaniv, NeurIPS 2017, without
their confidence bound). :func:`fit_abstention` returns the record the run stores::

    {"threshold": t, "target_precision": 0.95, "temperature": T, "achieved": true,
     "val": {"n", "accepted", "coverage", "precision"}, "test": {...}}
"""

from __future__ import annotations

import logging

import numpy as np

from prodclass.inference import softmax

log = logging.getLogger(__name__)

DEFAULT_TARGET_PRECISION = 0.95


def choose_threshold(confidence: np.ndarray, correct: np.ndarray, target_precision: float = DEFAULT_TARGET_PRECISION) -> tuple[float, bool]:
    """The lowest threshold whose accepted predictions reach ``target_precision``.

    Predictions are ranked by confidence; accepting every one with ``confidence >= t`` is
    evaluated only at the ends of runs of equal confidence (ties are accepted together), and the
    largest accepted set whose precision is ``>= target_precision`` wins.

    Args:
        confidence: float ``(N,)`` top-1 probabilities (after temperature scaling).
        correct: bool ``(N,)``, whether each top-1 prediction is right.
        target_precision: in (0, 1].

    Returns:
        ``(threshold, achieved)``. When no non-empty set reaches the target, ``achieved`` is
        False and the threshold is just above the largest confidence (everything abstains).

    Raises:
        ValueError: empty or mismatched arrays, or a target outside (0, 1].
    """
    conf, ok = np.asarray(confidence, np.float64).ravel(), np.asarray(correct, bool).ravel()
    if len(conf) == 0 or len(conf) != len(ok):
        raise ValueError(f"need equal non-empty confidence and correct arrays, got {len(conf)} and {len(ok)}")
    if not 0 < target_precision <= 1:
        raise ValueError(f"target precision must be in (0, 1], got {target_precision}")
    order = np.argsort(-conf, kind="stable")
    conf, ok = conf[order], ok[order]
    precision = np.cumsum(ok) / np.arange(1, len(ok) + 1)
    ends = np.r_[conf[1:] < conf[:-1], True]  # last index of each run of equal confidence
    good = np.flatnonzero(ends & (precision >= target_precision - 1e-12))
    if len(good) == 0:
        return float(np.nextafter(conf[0], np.inf)), False
    return float(conf[good[-1]]), True


def selective_metrics(confidence: np.ndarray, correct: np.ndarray, threshold: float) -> dict:
    """Coverage and precision of the predictions accepted at ``threshold``.

    Returns:
        ``{"n", "accepted", "coverage" (accepted / n), "precision" (correct / accepted; None
        when nothing is accepted), "accuracy_all" (top-1 accuracy without abstention)}``.
    """
    conf, ok = np.asarray(confidence, np.float64).ravel(), np.asarray(correct, bool).ravel()
    acc = conf >= threshold
    n_acc = int(acc.sum())
    return {"n": int(len(conf)), "accepted": n_acc, "coverage": n_acc / max(len(conf), 1),
            "precision": float(ok[acc].mean()) if n_acc else None,
            "accuracy_all": float(ok.mean()) if len(ok) else None}


def confidence_and_correct(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """float ``(N, C)`` logits + int ``(N,)`` labels → top-1 ``softmax(logits / T)`` ``(N,)`` and
    bool ``(N,)`` correctness."""
    p = softmax(logits, temperature)
    return p.max(1), p.argmax(1) == np.asarray(y_true)


def fit_abstention(val_logits: np.ndarray, val_y: np.ndarray, temperature: float = 1.0,
                   target_precision: float = DEFAULT_TARGET_PRECISION, test_logits: np.ndarray | None = None,
                   test_y: np.ndarray | None = None) -> dict:
    """Choose the threshold on validation predictions, and measure it on the test split.

    The probabilities are ``softmax(logits / temperature)`` with the run's calibrated ``T``, the
    same ones the :class:`prodclass.serving.predictor.Predictor` returns.

    Args:
        val_logits: float ``(N, C)``; val_y: int ``(N,)``. test_logits/test_y: optional, the same for test.

    Returns:
        The run's abstention record: ``threshold, achieved, target_precision, temperature``,
        ``val`` and (with test arrays) ``test``: :func:`selective_metrics` at the threshold.

    Raises:
        ValueError: as :func:`choose_threshold`.
    """
    out = {"target_precision": target_precision, "temperature": float(temperature)}
    conf, ok = confidence_and_correct(val_logits, val_y, temperature)
    out["threshold"], out["achieved"] = choose_threshold(conf, ok, target_precision)
    if not out["achieved"]:
        log.warning("no threshold reaches precision %.3f on validation; every prediction abstains", target_precision)
    out["val"] = selective_metrics(conf, ok, out["threshold"])
    if test_logits is not None:
        out["test"] = selective_metrics(*confidence_and_correct(test_logits, test_y, temperature), out["threshold"])
    return out
