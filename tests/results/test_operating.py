"""Prevalence, AUPRC and the operating point's counts with intervals, hand-computed on a few images."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from cxrflow.operating import operating_report, plot_pr, weighted_average_precision


def test_counts_prevalence_and_auprc_hand_computed():
    labels = np.array([[1], [1], [0], [0], [0]])
    probs = np.array([[0.9], [0.4], [0.6], [0.2], [0.1]])
    r = operating_report(labels, probs, np.arange(5), ["Mass"], [0.5], n_boot=200)
    assert r["prevalence"]["Mass"] == pytest.approx(0.4)
    assert r["counts"]["Mass"] == {"tp": 1, "fp": 1, "fn": 1, "tn": 2}
    # ranked 0.9 (pos) 0.6 (neg) 0.4 (pos): precision 1 at recall 0.5, 2/3 at recall 1 -> AP = (1 + 2/3) / 2
    assert r["auprc"]["Mass"] == pytest.approx(5 / 6)
    lo, hi = r["sensitivity_ci95"]["Mass"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0 and r["auprc_ci95"]["Mass"][0] <= 5 / 6


def test_weighted_average_precision_is_that_of_the_materialised_resample():
    rng = np.random.default_rng(2)
    y = rng.random(70) < 0.3
    s = rng.random(70).round(1)  # ties form one step each
    w = rng.integers(0, 3, (4, 70)).astype(float)
    got = weighted_average_precision(y, s, w)
    for b in range(4):
        c = w[b].astype(int)
        assert got[b] == pytest.approx(average_precision_score(np.repeat(y, c), np.repeat(s, c)), abs=1e-12)


def test_unknown_labels_are_left_out_and_no_threshold_means_no_counts():
    labels = np.array([[1], [0], [1], [0]])
    probs = np.array([[0.9], [0.8], [0.1], [0.2]])
    known = np.array([[1], [1], [0], [1]])
    r = operating_report(labels, probs, np.arange(4), ["A"], None, known=known, n_boot=20)
    assert r["prevalence"]["A"] == pytest.approx(1 / 3) and r["auprc"]["A"] == pytest.approx(1.0)
    assert "counts" not in r


def test_pr_figure_has_a_curve_per_finding():
    rng = np.random.default_rng(0)
    y = rng.random((100, 2)) < 0.3
    fig = plot_pr(y, rng.random((100, 2)), ["A", "B"], auprc=[0.4, None], title="PR test")
    (ax,) = fig.axes
    labels = [line.get_label() for line in ax.get_lines()]
    assert ax.get_title() == "PR test" and labels[0].startswith("A (AUPRC 0.400") and "AUPRC n/a" in labels[1]


def test_resampled_average_precision_equals_the_weighted_one():
    from cxrflow.operating import resampled_average_precision

    rng = np.random.default_rng(5)
    y = rng.random(90) < 0.25
    s = rng.random(90).round(1)
    patient = rng.integers(0, 30, 90)
    counts = rng.integers(0, 3, (6, 30))
    want = weighted_average_precision(y, s, counts[:, patient].astype(float))
    np.testing.assert_allclose(resampled_average_precision(y, s, patient, counts), want, atol=1e-12)
