"""Calibrated probabilities: per-finding temperature scaling, expected calibration error, Brier score.

A model trained with ``pos_weight`` ranks images well but its sigmoid outputs are inflated (most
positives read 1.00). Temperature scaling (Guo et al. 2017) divides each finding's logit by one
number ``T`` fitted on the validation split, which leaves the ranking (and so every AUC) unchanged
and makes the probabilities readable. The weighted loss also shifts every logit by a known amount:
the minimiser of BCE with positive weight ``w`` is ``logit(p) + log w``. Temperature scaling alone
cannot undo a shift, so the shift is subtracted first (``logit_offset = log w``, from the training
store's ``pos_weight``, nothing fitted) and ``T`` is fitted on the shifted logits:
``calibrated = sigmoid((logit - log w) / T)``.

- :func:`fit_temperature` / :func:`fit_temperatures`: ``T`` minimising the mean binary negative
  log-likelihood on validation logits, found by :func:`scipy.optimize.minimize_scalar` over
  ``log T`` (so ``T`` stays positive).
- :func:`expected_calibration_error`: ECE with equal-width bins. Written here because no installed
  library computes it (scikit-learn's :func:`~sklearn.calibration.calibration_curve` gives the bins'
  observed and predicted frequencies but drops empty bins and not their counts, which ECE weighs
  by); the bins are the same as ``calibration_curve``'s (``((m-1)/M, m/M]``, the first one closed),
  so the ECE and the reliability diagram describe the same bins.
- :func:`calibration_report`: the ``"calibration"`` block of ``metrics.json`` (temperatures, ECE
  and Brier score, :func:`sklearn.metrics.brier_score_loss`, before and after, per finding and
  averaged).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: Equal-width bins of the expected calibration error and the reliability diagram.
ECE_BINS = 15
#: ``log T`` is searched in this interval: T from about 0.02 (sharpen) to about 55 (flatten).
_LOG_T_BOUNDS = (-4.0, 4.0)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, float64, without overflow warnings for large negative logits."""
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def logit(p: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Inverse of :func:`sigmoid`, with probabilities clipped to ``[eps, 1 - eps]``."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def binary_nll(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy of ``sigmoid(logits)`` against 0/1 labels (log-sum-exp stable)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float | None:
    """The temperature ``T > 0`` minimising the NLL of ``sigmoid(logits / T)``; None when the labels
    take one value only (the NLL then falls without bound as ``T`` shrinks or grows, so no
    temperature is fitted)."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if z.size == 0 or y.min() == y.max():
        return None
    result = minimize_scalar(
        lambda log_t: binary_nll(z / np.exp(log_t), y), bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6}
    )
    return float(np.exp(result.x))


def _known_mask(known: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """``[N, K]`` bool: which labels are known (all of them without a mask)."""
    return np.ones(shape, dtype=bool) if known is None else np.asarray(known).astype(bool)


def fit_temperatures(logits: np.ndarray, labels: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
    """Per-finding temperatures ``float64[K]`` for ``[N, K]`` logits and labels, fitted on each
    finding's known labels (``known`` ``[N, K]``, all without it); NaN where none is fitted."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.shape != labels.shape or logits.ndim != 2:
        raise ValueError(f"logits {logits.shape} and labels {labels.shape} must both be [N, K]")
    mask = _known_mask(known, labels.shape)
    fitted = [fit_temperature(logits[mask[:, j], j], labels[mask[:, j], j]) for j in range(logits.shape[1])]
    return np.array([np.nan if t is None else t for t in fitted])


def apply_temperatures(logits: np.ndarray, temperatures: np.ndarray, offsets: np.ndarray | None = None) -> np.ndarray:
    """Calibrated probabilities ``sigmoid((logit - offset) / T)`` per finding; a NaN temperature
    counts as 1, no offsets as 0."""
    t = np.asarray(temperatures, dtype=np.float64)
    t = np.where(np.isnan(t), 1.0, t)
    z = np.asarray(logits, dtype=np.float64)
    if offsets is not None:
        z = z - np.asarray(offsets, dtype=np.float64)
    return sigmoid(z / t)


def pos_weight_offsets(pos_weight: Sequence[float] | None, k: int) -> np.ndarray:
    """``log pos_weight`` per finding (the logit shift of the weighted training loss); zeros without one."""
    if pos_weight is None or len(pos_weight) != k:
        return np.zeros(k)
    return np.log(np.maximum(np.asarray(pos_weight, dtype=np.float64), 1e-12))


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of one finding: ``sum_b (n_b / N) |observed_b - mean predicted_b|`` over ``bins``
    equal-width bins of ``[0, 1]``; NaN without samples."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    if y.size == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    ids = np.searchsorted(edges[1:-1], p)  # calibration_curve's bins
    gap = np.abs(np.bincount(ids, weights=y, minlength=bins) - np.bincount(ids, weights=p, minlength=bins))
    return float(gap.sum() / y.size)  # |sum y - sum p| per bin = n_b |observed - predicted|


def _per_finding(values: np.ndarray, names: Sequence[str]) -> dict[str, float | None]:
    return {n: None if np.isnan(v) else float(v) for n, v in zip(names, values)}


def _mean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else None


def ece_and_brier(
    labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS, known: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-finding ECE and Brier score ``float64[K]`` of ``[N, K]`` labels and probabilities, over
    each finding's known labels (``known`` ``[N, K]``, all without it)."""
    from sklearn.metrics import brier_score_loss

    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    mask = _known_mask(known, labels.shape)
    k = labels.shape[1]
    ece = np.array([expected_calibration_error(labels[mask[:, j], j], probs[mask[:, j], j], bins) for j in range(k)])
    brier = np.array(
        [
            brier_score_loss(labels[mask[:, j], j].astype(int), probs[mask[:, j], j], pos_label=1)
            if mask[:, j].any()
            else np.nan
            for j in range(k)
        ]
    )
    return ece, brier


def calibration_report(
    temperatures: np.ndarray,
    labels: np.ndarray,
    raw_probs: np.ndarray,
    calibrated_probs: np.ndarray,
    label_names: Sequence[str],
    *,
    offsets: np.ndarray | None = None,
    bins: int = ECE_BINS,
    fitted_on: str = "val",
    known: np.ndarray | None = None,
) -> dict[str, Any]:
    """The ``"calibration"`` block of ``metrics.json``: temperatures (and the logit offsets
    subtracted before them), ECE and Brier before/after.

    Means are over the findings that have a value; a finding without a fitted temperature
    (one label value in the fitting split) keeps ``T = 1`` and is listed under ``"unfitted"``.
    """
    names = list(label_names)
    t = np.asarray(temperatures, dtype=np.float64)
    ece_before, brier_before = ece_and_brier(labels, raw_probs, bins, known)
    ece_after, brier_after = ece_and_brier(labels, calibrated_probs, bins, known)
    return {
        "method": "temperature",
        "fitted_on": fitted_on,
        "bins": int(bins),
        "temperature": {n: 1.0 if np.isnan(v) else float(v) for n, v in zip(names, t)},
        "logit_offset": {n: float(v) for n, v in zip(names, np.zeros(len(names)) if offsets is None else offsets)},
        "formula": "calprob = sigmoid((logit - logit_offset) / temperature)",
        "unfitted": [n for n, v in zip(names, t) if np.isnan(v)],
        "ece": {"before": _per_finding(ece_before, names), "after": _per_finding(ece_after, names)},
        "ece_mean": {"before": _mean(ece_before), "after": _mean(ece_after)},
        "brier": {"before": _per_finding(brier_before, names), "after": _per_finding(brier_after, names)},
        "brier_mean": {"before": _mean(brier_before), "after": _mean(brier_after)},
    }


def calibration_of(calibration: dict | None, label_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(temperatures, logit offsets) ``float64[K]`` recorded in a ``"calibration"`` block, or None without one."""
    if not calibration or "temperature" not in calibration:
        return None
    temperature = calibration["temperature"]
    offset = calibration.get("logit_offset") or {}
    return (
        np.array([float(temperature.get(n) or 1.0) for n in label_names]),
        np.array([float(offset.get(n) or 0.0) for n in label_names]),
    )
