import math

import numpy as np
import pytest

from cxrflow.modelling.calibration import (
    apply_temperatures,
    binary_nll,
    calibration_of,
    calibration_report,
    ece_and_brier,
    expected_calibration_error,
    fit_temperature,
    fit_temperatures,
    logit,
    pos_weight_offsets,
    sigmoid,
)
from cxrflow.plots import plot_reliability


def test_ece_hand_computed():
    # 15 bins of width 1/15: 0.05 -> bin 0, 0.21 and 0.25 -> bin 3 ((0.2, 0.2667]), 0.9 and 0.95 -> bins 13, 14
    # bin 0: 1 image, observed 0, predicted 0.05           -> 1/5 * 0.05
    # bin 3: 2 images, observed 1/2, predicted 0.23        -> 2/5 * 0.27
    # bin 13 (0.8667, 0.9333]: 0.9, observed 1             -> 1/5 * 0.1
    # bin 14 (0.9333, 1]: 0.95, observed 0                 -> 1/5 * 0.95
    y = [0, 1, 0, 1, 0]
    p = [0.05, 0.21, 0.25, 0.9, 0.95]
    assert expected_calibration_error(y, p) == pytest.approx(0.328)  # (0.05 + 0.54 + 0.1 + 0.95) / 5
    # perfectly calibrated in every bin: 0 ; all wrong with full confidence: 1
    assert expected_calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.0
    assert expected_calibration_error([0, 1], [1.0, 0.0]) == 1.0
    assert math.isnan(expected_calibration_error([], []))


def test_ece_bin_edges_follow_calibration_curve():
    # 1/15 lies on an edge: it belongs to the first bin, (0, 1/15], as in sklearn's calibration_curve
    y = [1, 0]
    p = [1 / 15, 0.0]
    # one bin, observed 1/2, predicted 1/30
    assert expected_calibration_error(y, p) == pytest.approx(abs(0.5 - 1 / 30))
    assert expected_calibration_error(y, p, bins=2) == pytest.approx(abs(0.5 - 1 / 30))


def test_temperature_recovers_a_known_scale_and_lowers_ece():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(-1.0, 1.5, (4000, 2))
    labels = (rng.random(true_logit.shape) < sigmoid(true_logit)).astype(np.uint8)
    overconfident = true_logit * np.array([3.0, 0.5])  # too sharp for finding 0, too flat for finding 1
    t = fit_temperatures(overconfident[:2000], labels[:2000])
    assert t[0] == pytest.approx(3.0, rel=0.12) and t[1] == pytest.approx(0.5, rel=0.12)
    before, _ = ece_and_brier(labels[2000:], sigmoid(overconfident[2000:]))
    after, _ = ece_and_brier(labels[2000:], apply_temperatures(overconfident[2000:], t))
    assert (after < before).all() and after.max() < 0.03 < before.min()
    # the fitted temperature is the NLL minimum
    z, y = overconfident[:2000, 0], labels[:2000, 0]
    assert binary_nll(z / t[0], y) <= min(binary_nll(z / (t[0] * f), y) for f in (0.95, 1.05))


def test_one_class_gets_no_temperature():
    assert fit_temperature([1.0, 2.0, -1.0], [0, 0, 0]) is None
    t = fit_temperatures(np.array([[1.0, 0.5], [-1.0, 0.2]]), np.array([[1, 0], [0, 0]]))
    assert not np.isnan(t[0]) and np.isnan(t[1])
    np.testing.assert_allclose(apply_temperatures([[0.0, 2.0]], t)[0, 1], sigmoid(2.0))


def test_logit_inverts_sigmoid_and_sigmoid_is_stable():
    x = np.array([-10.0, -2.0, 0.0, 3.0])
    np.testing.assert_allclose(logit(sigmoid(x)), x, rtol=1e-6)
    assert logit(0.0) == pytest.approx(math.log(1e-7), rel=1e-6)  # clipped, finite
    with np.errstate(over="raise", invalid="raise"):
        assert sigmoid(-1000.0) == 0.0 and sigmoid(1000.0) == 1.0


def test_report_block_shape_and_means():
    names = ["A", "B", "C"]
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    raw = np.array([[0.9, 0.8, 0.1], [0.7, 0.6, 0.2], [0.99, 0.9, 0.3], [0.2, 0.1, 0.4]])
    cal = np.clip(raw - 0.1, 0, 1)
    block = calibration_report(np.array([2.0, np.nan, 0.5]), y, raw, cal, names)
    assert block["method"] == "temperature" and block["fitted_on"] == "val" and block["bins"] == 15
    assert block["temperature"] == {"A": 2.0, "B": 1.0, "C": 0.5} and block["unfitted"] == ["B"]
    for key in ("ece", "brier"):
        for when in ("before", "after"):
            per = block[key][when]
            assert list(per) == names
            assert block[f"{key}_mean"][when] == pytest.approx(np.mean(list(per.values())))
    assert block["brier"]["before"]["C"] == pytest.approx(np.mean(raw[:, 2] ** 2))
    assert block["ece"]["after"]["A"] == pytest.approx(expected_calibration_error(y[:, 0], cal[:, 0]))
    assert block["logit_offset"] == {"A": 0.0, "B": 0.0, "C": 0.0}
    t, off = calibration_of(block, ["C", "A"])
    np.testing.assert_allclose(t, [0.5, 2.0]) and np.testing.assert_allclose(off, [0.0, 0.0])
    assert calibration_of(None, names) is None


def test_reliability_figure_has_labels_and_two_curves():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 3)) < 0.3).astype(int)
    p = rng.random((200, 3))
    fig = plot_reliability(y, {"before": p, "after": p * 0.5}, title="Reliability test")
    (ax,) = fig.axes
    assert ax.get_title() == "Reliability test" and "probability" in ax.get_xlabel() and "frequency" in ax.get_ylabel()
    assert [line.get_label() for line in ax.get_lines()] == ["perfect calibration", "before", "after"]


def test_pos_weight_offset_undoes_the_weighted_loss_shift():
    # a model trained with BCE and positive weight w outputs logit(p) + log w; the offset removes it
    rng = np.random.default_rng(1)
    true_logit = rng.normal(-2.0, 1.0, (3000, 1))
    labels = (rng.random(true_logit.shape) < sigmoid(true_logit)).astype(np.uint8)
    w = 9.0
    shifted = true_logit + math.log(w)
    offsets = pos_weight_offsets([w], 1)
    assert offsets[0] == pytest.approx(math.log(9.0))
    t_only = fit_temperatures(shifted, labels)
    t_after_offset = fit_temperatures(shifted - offsets, labels)
    assert t_after_offset[0] == pytest.approx(1.0, abs=0.1)
    ece_t_only = expected_calibration_error(labels, apply_temperatures(shifted, t_only))
    ece_offset = expected_calibration_error(labels, apply_temperatures(shifted, t_after_offset, offsets))
    assert ece_offset < 0.03 < ece_t_only  # a temperature alone cannot undo a shift
    np.testing.assert_array_equal(pos_weight_offsets(None, 3), np.zeros(3))
