"""Calibration: expected calibration error and temperature scaling.

ECE is the equal-width, 15-bin, top-label expected calibration error of Guo, Pleiss, Sun and
Weinberger, "On Calibration of Modern Neural Networks" (ICML 2017, eq. 3): predictions are
binned by their top-1 confidence into ``((m-1)/M, m/M]`` and
``ECE = Σ_m |B_m|/n · |acc(B_m) − conf(B_m)|``.

Temperature scaling (same paper, §4.2) divides all logits by one scalar ``T > 0`` fitted by
minimising the negative log-likelihood on the validation split; it never changes the argmax, so
accuracy is unchanged. :func:`calibrate` fits it on validation logits and returns what the
pipeline stores as the run's calibration, which :class:`prodclass.serving.predictor.Predictor`
applies at prediction time. Arrays in, values out: this module reads and writes no file.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from prodclass.inference import softmax

N_BINS = 15
T_BOUNDS = (0.05, 20.0)


def nll(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (nats) of int ``(N,)`` labels under ``softmax(logits / T)``."""
    lp = log_softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    return float(-lp[np.arange(len(y_true)), y_true].mean())


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Top-label reliability statistics over equal-width confidence bins ``((m-1)/M, m/M]``.

    Args:
        probs: float ``(N, C)`` class probabilities. y_true: int ``(N,)`` class ids.
        n_bins: M (15 as in Guo et al. 2017).

    Returns:
        ``{"edges": (M+1,), "count": (M,) int, "confidence": (M,), "accuracy": (M,)}`` — mean
        top-1 confidence and accuracy per bin (NaN for empty bins).
    """
    probs, y_true = np.asarray(probs), np.asarray(y_true)
    if probs.ndim != 2 or len(probs) != len(y_true):
        raise ValueError(f"probs must be (N, C) matching y_true (N,), got {probs.shape} and {y_true.shape}")
    conf = probs.max(1)
    correct = (probs.argmax(1) == y_true).astype(np.float64)
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.searchsorted(edges[1:-1], conf, side="left")  # right-closed bins, as sklearn's calibration_curve
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        mean_acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": mean_acc}


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = N_BINS) -> float:
    """Top-label ECE in [0, 1] (Guo et al. 2017, eq. 3) of ``(N, C)`` probabilities vs ``(N,)`` labels."""
    b = reliability_bins(probs, y_true, n_bins)
    nz = b["count"] > 0
    return float(np.sum(b["count"][nz] * np.abs(b["accuracy"][nz] - b["confidence"][nz])) / b["count"].sum())


def fit_temperature(logits: np.ndarray, y_true: np.ndarray, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """Temperature minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017, §4.2).

    Bounded scalar minimisation (scipy, Brent) over ``log T`` in ``log(bounds)``; NLL is convex
    in ``1/T``, so the minimum is unique.

    Args:
        logits: float ``(N, C)`` validation logits. y_true: int ``(N,)`` validation class ids.

    Returns:
        T in ``bounds`` (> 1 softens over-confident logits, < 1 sharpens).

    Raises:
        ValueError: empty or mismatched inputs.
    """
    logits, y_true = np.asarray(logits, np.float64), np.asarray(y_true, np.int64)
    if logits.ndim != 2 or len(logits) == 0 or len(logits) != len(y_true):
        raise ValueError(f"need (N, C) logits and (N,) labels with N > 0, got {logits.shape} and {y_true.shape}")
    res = minimize_scalar(lambda lt: nll(logits, y_true, np.exp(lt)), bounds=np.log(bounds),
                          method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def calibrate(val_logits: np.ndarray, val_y: np.ndarray, test_logits: np.ndarray | None = None,
              test_y: np.ndarray | None = None, n_bins: int = N_BINS) -> dict:
    """Fit the temperature on validation logits and measure ECE/NLL before and after.

    Args:
        val_logits: float ``(N, C)`` validation logits. val_y: int ``(N,)`` validation class ids.
        test_logits, test_y: optionally the test split's, for the headline figures.
        n_bins: ECE bins (15, Guo et al. 2017).

    Returns:
        The ``calibration.json`` content: ``temperature``, ``warning``, ``split`` (``test`` when
        test arrays were given, else ``val``), that split's ``n, ece_before, ece_after, nll_before,
        nll_after``, ``val`` (the same figures on validation), ``n_bins``, ``method``.
        ``warning``: None, or why T is unreliable: a validation split the model gets entirely right
        has no NLL minimum (it falls towards 0 as T → 0), so T = 1 is kept; or T ended at a bound
        of :data:`T_BOUNDS`.

    Raises:
        ValueError: empty or mismatched arrays.
    """
    val_logits, val_y = np.asarray(val_logits), np.asarray(val_y, np.int64)
    all_right = bool(len(val_y)) and bool((val_logits.argmax(1) == val_y).all())
    temp = 1.0 if all_right else fit_temperature(val_logits, val_y)
    val = _figures(val_logits, val_y, temp, n_bins)
    warning = None
    if all_right:
        warning = ("every validation image is classified correctly, so the validation NLL has no minimum "
                   "(it falls as T -> 0); T = 1 kept: too few or too easy validation images to calibrate")
    elif np.abs(np.log(temp / np.array(T_BOUNDS))).min() < 0.05:
        warning = f"T = {temp:.3g} is at a bound of the search range {T_BOUNDS}"
    out = {"temperature": temp, "warning": warning, "split": "val", **val}
    if test_logits is not None:
        out.update(_figures(np.asarray(test_logits), np.asarray(test_y, np.int64), temp, n_bins), split="test")
    out.update(n_bins=n_bins, val=val,
               method="temperature scaling fitted by minimising validation NLL (Guo et al. 2017); "
                      f"ECE: {n_bins} equal-width bins, top-label")
    return out


def _figures(z: np.ndarray, y: np.ndarray, temp: float, n_bins: int) -> dict:
    return {"n": int(len(y)),
            "ece_before": expected_calibration_error(softmax(z), y, n_bins),
            "ece_after": expected_calibration_error(softmax(z, temp), y, n_bins),
            "nll_before": nll(z, y), "nll_after": nll(z, y, temp)}
