"""evaluation.metrics against scikit-learn and Guo et al.'s ECE, on small hand-made arrays (no backbone)."""

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from prodclass.evaluation import metrics as M
from prodclass.evaluation.calibration import expected_calibration_error, nll
from prodclass.inference import softmax


def _random_logits(n=300, c=6, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    z = rng.normal(size=(n, c))
    z[np.arange(n), y] += rng.uniform(0, 3, n)  # informative but imperfect
    return y, z.astype(np.float32)


def _random_probs(n=300, c=6, seed=0):
    y, z = _random_logits(n, c, seed)
    return y, softmax(z)


def test_ovr_metrics_match_sklearn():
    y, p = _random_probs()
    m = M.ovr_metrics(y, p, [f"c{i}" for i in range(6)])
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
    m = M.ovr_metrics(y, p, list("abcd"))
    assert np.isnan(m["per_class"]["roc_auc"].iloc[3])
    Y = np.eye(4)[y][:, :3]
    assert m["roc_auc_macro"] == pytest.approx(skm.roc_auc_score(Y, p[:, :3], average="macro"))


def test_confused_pairs_counts_and_shares():
    classes = ["a", "b", "c"]
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 2, 1, 0, 2, 2])
    t = M.confused_pairs(y_true, y_pred, classes)
    assert t.iloc[0].tolist() == ["a", "b", 2, 0.5]
    assert len(t) == 3 and set(zip(t["true"], t["predicted"], strict=True)) == {("a", "b"), ("a", "c"), ("b", "a")}


def test_stage_spans():
    hist = [{"stage": "head"}] * 4 + [{"stage": "finetune"}] * 3 + [{}]
    assert M.stage_spans(hist) == [("head", 1, 4), ("finetune", 5, 7), ("head", 8, 8)]
    assert M.stage_spans([]) == []


def test_per_class_table_worst_first():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 0])  # F1: a 0.8, b 1, c 0.667
    t = M.per_class_table(y_true, y_pred, ["a", "b", "c"])
    assert t["class"].tolist() == ["c", "a", "b"]
    assert t["support"].tolist() == [2, 2, 2]


def test_test_metrics_with_a_temperature():
    y, z = _random_logits()
    classes = [f"c{i}" for i in range(6)]
    m = M.test_metrics(y, z, classes, temperature=1.7, top_k=3)
    p_raw, p_cal = softmax(z), softmax(z, 1.7)
    # the classification metrics are those of the uncalibrated probabilities
    assert {k: v for k, v in m.items() if k in M.classification_metrics(y, p_raw, classes, 3)} == \
        M.classification_metrics(y, p_raw, classes, 3)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, z.argmax(1)))
    assert m["top3_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, p_raw, k=3))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, p_raw))
    assert m["temperature"] == 1.7
    assert m["ece_before"] == pytest.approx(expected_calibration_error(p_raw, y))
    assert m["ece_after"] == pytest.approx(expected_calibration_error(p_cal, y))
    assert m["log_loss_calibrated"] == pytest.approx(nll(z, y, 1.7)) and m["log_loss_calibrated"] == \
        pytest.approx(skm.log_loss(y, p_cal))
    # ROC/PR of the calibrated probabilities
    assert m["roc_auc_macro"] == pytest.approx(skm.roc_auc_score(y, p_cal, multi_class="ovr", average="macro"))
    assert m["average_precision_micro"] == pytest.approx(skm.average_precision_score(np.eye(6)[y], p_cal,
                                                                                      average="micro"))
    assert set(M.CALIBRATION_KEYS) | set(M.OVR_KEYS) <= set(m) and "per_class" not in m
    assert all(isinstance(v, (int, float)) for v in m.values())  # JSON-able as it is


def test_test_metrics_without_calibration():
    y, z = _random_logits(c=4, seed=1)
    m = M.test_metrics(y, z, list("abcd"), temperature=None, top_k=5)
    assert m["temperature"] is None and m["ece_after"] is None and m["log_loss_calibrated"] is None
    assert m["ece_before"] == pytest.approx(expected_calibration_error(softmax(z), y))
    assert m["roc_auc_macro"] == pytest.approx(skm.roc_auc_score(y, softmax(z), multi_class="ovr"))
    assert m["top5_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, softmax(z), k=3))  # k clipped to C - 1


def test_test_metrics_rejects_mismatched_shapes():
    y, z = _random_logits(n=10, c=3)
    with pytest.raises(ValueError, match=r"C = 2 classes.*\(10, 3\)"):
        M.test_metrics(y, z, list("ab"), 1.0, 5)
    with pytest.raises(ValueError, match="N = 9 labels"):
        M.test_metrics(y[:9], z, list("abc"), 1.0, 5)
    with pytest.raises(ValueError):
        M.test_metrics(y[:0], z[:0], list("abc"), None, 5)


def test_test_metrics_is_not_collected_as_a_test():
    assert M.test_metrics.__test__ is False


def test_format_table():
    t = pd.DataFrame({"class": ["a"], "f1": [0.12345]})
    assert "0.123" in M.format_table(t)
