"""ECE and temperature scaling on constructed cases with known answers, and on a real run."""

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import log_loss

from prodclass.evaluation.calibration import (
    calibrate,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
)
from prodclass.inference import softmax


def _probs(conf: np.ndarray, pred: np.ndarray, c: int = 4) -> np.ndarray:
    """(N, C) rows with top-1 ``conf`` on class ``pred``, the rest spread evenly."""
    p = np.tile(((1 - conf) / (c - 1))[:, None], (1, c))
    p[np.arange(len(conf)), pred] = conf
    return p


def test_ece_of_constant_confidence_is_the_accuracy_gap():
    # 10 predictions at confidence 0.8, 6 correct: one bin, |0.6 - 0.8| = 0.2
    y = np.array([0] * 6 + [1] * 4)
    p = _probs(np.full(10, 0.8), np.zeros(10, int))
    assert expected_calibration_error(p, y) == pytest.approx(0.2)


def test_ece_weights_bins_by_their_size():
    # bin (0.533, 0.6]: 4 at 0.55, 2 correct (gap 0.05); bin (0.933, 1]: 6 at 0.95, all correct (gap 0.05)
    conf = np.array([0.55] * 4 + [0.95] * 6)
    y = np.array([0, 0, 1, 1] + [0] * 6)
    p = _probs(conf, np.zeros(10, int))
    assert expected_calibration_error(p, y) == pytest.approx(0.4 * 0.05 + 0.6 * 0.05)
    b = reliability_bins(p, y)
    assert b["count"].sum() == 10 and b["count"][8] == 4 and b["count"][14] == 6
    assert b["accuracy"][8] == pytest.approx(0.5) and np.isnan(b["accuracy"][0])


def test_ece_bins_are_right_closed():
    # Guo et al.: bin m is ((m-1)/M, m/M]; a confidence of exactly 3/15 = 0.2 falls in bin 3 (index 2), 1.0 in the last
    p = _probs(np.array([0.2, 1.0]), np.zeros(2, int), c=6)
    assert p[0].max() == pytest.approx(0.2)
    b = reliability_bins(p, np.array([0, 0]))
    assert b["count"][2] == 1 and b["count"][14] == 1


def test_ece_is_zero_when_confidence_equals_accuracy_per_bin():
    # per bin, the share of correct predictions equals the (constant) confidence
    conf = np.array([0.5] * 4 + [0.75] * 4 + [1.0] * 3)
    y = np.array([0, 0, 1, 1] + [0, 0, 0, 1] + [0, 0, 0])
    assert expected_calibration_error(_probs(conf, np.zeros(11, int)), y) == pytest.approx(0.0, abs=1e-12)


def test_ece_matches_sklearn_calibration_curve():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2000, 10)) * 3
    y = rng.integers(0, 10, 2000)
    y[:1200] = logits[:1200].argmax(1)  # 60 % right at least: a spread of confidences
    p = softmax(logits)
    correct = (p.argmax(1) == y).astype(int)
    prob_true, prob_pred = calibration_curve(correct, p.max(1), n_bins=15, strategy="uniform")
    counts = np.histogram(p.max(1), bins=np.linspace(0, 1, 16))[0]
    expected = np.sum(counts[counts > 0] * np.abs(prob_true - prob_pred)) / len(y)
    assert expected_calibration_error(p, y) == pytest.approx(expected, rel=1e-9)


def test_ece_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="match"):
        expected_calibration_error(np.full((3, 2), 0.5), np.zeros(4, int))


def test_nll_matches_sklearn_log_loss():
    rng = np.random.default_rng(1)
    z, y = rng.normal(size=(50, 5)), rng.integers(0, 5, 50)
    assert nll(z, y, 2.0) == pytest.approx(log_loss(y, softmax(z, 2.0), labels=range(5)))


def test_fit_temperature_recovers_the_temperature_that_generated_labels():
    # labels drawn from softmax(z / 2.5): the NLL-optimal temperature for z is 2.5
    rng = np.random.default_rng(0)
    z = rng.normal(size=(20000, 10)) * 4
    p = softmax(z, 2.5)
    y = (p.cumsum(1) > rng.random((len(z), 1))).argmax(1)
    t = fit_temperature(z, y)
    assert t == pytest.approx(2.5, rel=0.05)
    assert expected_calibration_error(softmax(z, t), y) < 0.02 < expected_calibration_error(softmax(z), y)


def test_fit_temperature_scales_with_the_logits_and_keeps_the_argmax():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(500, 6)) * 2
    y = np.where(rng.random(500) < 0.7, z.argmax(1), rng.integers(0, 6, 500))
    t = fit_temperature(z, y)
    assert fit_temperature(3 * z, y) == pytest.approx(3 * t, rel=1e-4)
    assert (softmax(z, t).argmax(1) == z.argmax(1)).all()
    assert nll(z, y, t) <= min(nll(z, y, t * 1.05), nll(z, y, t / 1.05))


def test_calibrate_warns_when_validation_is_all_correct():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 1, (50, 4))
    cal = calibrate(z, z.argmax(1))  # every validation prediction right: the NLL has no minimiser
    assert "every validation image" in cal["warning"] and cal["temperature"] == 1.0
    assert cal["ece_after"] == cal["ece_before"]


def test_fit_temperature_rejects_empty_input():
    with pytest.raises(ValueError, match="N > 0"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, int))


def test_calibrate_fits_on_validation_and_reports_test():
    rng = np.random.default_rng(4)
    y_val, y_test = rng.integers(0, 5, 400), rng.integers(0, 5, 300)
    z_val = 4 * rng.normal(0, 1, (400, 5)) + 3 * np.eye(5)[y_val]  # over-confident: T > 1
    z_test = 4 * rng.normal(0, 1, (300, 5)) + 3 * np.eye(5)[y_test]
    cal = calibrate(z_val, y_val, z_test, y_test)
    assert cal["temperature"] == pytest.approx(fit_temperature(z_val, y_val)) and cal["temperature"] > 1
    assert cal["split"] == "test" and cal["n"] == 300 and cal["val"]["n"] == 400
    assert cal["val"]["nll_after"] <= cal["val"]["nll_before"] + 1e-12
    assert cal["ece_after"] < cal["ece_before"] and cal["warning"] is None


@pytest.mark.shared_data
def test_the_predictor_applies_the_runs_calibration(tiny_run):
    from prodclass.runs import RunDir
    from prodclass.serving.predictor import Predictor

    cal = RunDir(tiny_run).read_calibration()
    assert {"ece_before", "ece_after", "n_bins", "temperature"} <= set(cal)
    assert Predictor.from_run(tiny_run).temperature == pytest.approx(cal["temperature"])
