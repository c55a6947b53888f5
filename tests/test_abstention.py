"""Abstention threshold: known answers on constructed arrays, a brute-force check, and the run files."""

import json

import numpy as np
import pytest

from prodclass.evaluation.abstention import choose_threshold, confidence_and_correct, fit_abstention, selective_metrics


def test_threshold_known_answer():
    conf = np.array([0.6, 0.99, 0.8, 0.95, 0.7, 0.9])  # unsorted on purpose
    ok = np.array([0, 1, 0, 1, 1, 1], bool)
    # ranked: .99 T, .95 T, .9 T, .8 F, .7 T, .6 F -> precision 1, 1, 1, .75, .8, .667
    assert choose_threshold(conf, ok, 0.95) == (0.9, True)
    assert choose_threshold(conf, ok, 0.8) == (0.7, True)  # non-monotone curve: the largest coverage wins
    assert choose_threshold(conf, ok, 0.6) == (0.6, True)
    m = selective_metrics(conf, ok, 0.7)
    assert m == {"n": 6, "accepted": 5, "coverage": 5 / 6, "precision": 0.8, "accuracy_all": 4 / 6}


def test_ties_are_accepted_together_and_unreachable_target_abstains_all():
    conf, ok = np.array([0.9, 0.9, 0.8]), np.array([True, False, True])
    assert choose_threshold(conf, ok, 0.6) == (0.8, True)  # {.9,.9} = .5, all three = .667
    t, achieved = choose_threshold(conf, ok, 0.9)  # the lone correct .9 cannot be split from its tie
    assert not achieved and t > 0.9
    assert selective_metrics(conf, ok, t)["accepted"] == 0 and selective_metrics(conf, ok, t)["precision"] is None


def test_threshold_is_the_lowest_meeting_the_target_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        conf = rng.choice(np.linspace(0.2, 1, 9), n)  # many ties
        ok = rng.random(n) < conf
        target = float(rng.choice([0.5, 0.8, 0.95]))
        t, achieved = choose_threshold(conf, ok, target)
        feasible = [c for c in np.unique(conf) if ok[conf >= c].mean() >= target]
        assert achieved == bool(feasible)
        if feasible:
            assert t == min(feasible) and ok[conf >= t].mean() >= target


def test_bad_arguments():
    with pytest.raises(ValueError, match="non-empty"):
        choose_threshold(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="target precision"):
        choose_threshold(np.array([0.5]), np.array([True]), 1.5)


def test_fit_abstention_uses_the_given_temperature():
    rng = np.random.default_rng(1)
    arrays = {}
    for split in ("val", "test"):
        y = rng.integers(0, 4, 300)
        arrays[split] = (rng.normal(0, 1, (300, 4)) + 3 * np.eye(4)[y] * rng.random((300, 1)), y)
    out = fit_abstention(*arrays["val"], temperature=2.0, target_precision=0.9,
                         test_logits=arrays["test"][0], test_y=arrays["test"][1])
    conf, ok = confidence_and_correct(*arrays["val"], 2.0)
    assert (out["threshold"], out["achieved"]) == choose_threshold(conf, ok, 0.9)
    assert out["threshold"] != fit_abstention(*arrays["val"], temperature=1.0, target_precision=0.9)["threshold"]
    assert out["temperature"] == 2.0 and out["val"]["precision"] >= 0.9 > out["val"]["accuracy_all"]
    assert 0 < out["test"]["coverage"] < 1 and out["test"]["n"] == 300


@pytest.mark.shared_data
def test_pipeline_stores_threshold_and_test_coverage(tiny_run):
    abst = json.loads((tiny_run / "abstention.json").read_text())
    m = json.loads((tiny_run / "metrics.json").read_text())["abstention"]
    assert m["threshold"] == abst["threshold"] and m["coverage"] == abst["test"]["coverage"]
    assert abst["target_precision"] == 0.95 and abst["threshold"] > 0
    assert (abst["val"]["precision"] or 0) >= 0.95 if abst["achieved"] else abst["val"]["accepted"] == 0
