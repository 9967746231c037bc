"""Ranking metrics over a whole epoch or split, with patient-level bootstrap intervals and operating points.

Per-finding ROC AUC is computed over all samples at once (never averaged over batches). A finding
whose labels take one value only has no AUC: it is NaN and left out of the mean. ROC curves and
AUC come from :mod:`sklearn.metrics`; this module adds the NaN convention, the per-finding loop and
what no library offers:

- :func:`bootstrap_aucs` / :func:`bootstrap_auc_ci`: 95% percentile bootstrap intervals of the
  per-finding AUC and of the mean AUC, resampling *patients* with replacement (images of one patient
  are not independent, so resampling images would give intervals that are too narrow).
- :func:`youden_threshold` / :func:`sensitivity_specificity`: a decision threshold per finding chosen
  on the validation split (Youden's J), and the sensitivity and specificity it gives on the evaluated
  split.
- :func:`summarize`: everything above as the core of an evaluation's ``metrics.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def binary_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC of one finding (ties count half); NaN with one class only."""
    y_true = np.asarray(y_true).astype(bool).ravel()
    y_score = np.asarray(y_score, dtype=np.float64).ravel()
    if y_true.all() or not y_true.any():
        return float("nan")
    return float(roc_auc_score(y_true, y_score))


def roc(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, from (0, 0) (threshold inf) to (1, 1):
    calling ``score >= thresholds[i]`` positive gives ``fpr[i]`` and ``tpr[i]``. Needs both classes."""
    y_true = np.asarray(y_true).astype(bool).ravel()
    if y_true.all() or not y_true.any():
        raise ValueError("an ROC curve needs positive and negative labels")
    return roc_curve(y_true, np.asarray(y_score, dtype=np.float64).ravel(), drop_intermediate=False)


def per_class_auc(y_true: np.ndarray, y_score: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
    """AUC of each column of ``[N, K]`` labels and scores; NaN where a column has one class.

    ``known`` ([N, K], 0/1): only the rows where a column's label is known count for it.
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score)
    if y_true.shape != y_score.shape or y_true.ndim != 2:
        raise ValueError(f"labels {y_true.shape} and scores {y_score.shape} must both be [N, K]")
    if known is None:
        return np.array([binary_auc(y_true[:, k], y_score[:, k]) for k in range(y_true.shape[1])])
    m = np.asarray(known).astype(bool)
    return np.array([binary_auc(y_true[m[:, k], k], y_score[m[:, k], k]) for k in range(y_true.shape[1])])


def mean_auc(aucs: np.ndarray) -> float:
    """Mean over the findings that have an AUC; NaN when none has."""
    aucs = np.asarray(aucs, dtype=np.float64)
    valid = aucs[~np.isnan(aucs)]
    return float(valid.mean()) if valid.size else float("nan")


# --------------------------------------------------------------------------------------------------
# bootstrap


def _weighted_auc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUC of one finding under each row of integer image weights ``w[B, N]`` (mid-rank ties).

    A weight of ``c`` counts the image ``c`` times, which is exactly the AUC of a resample that
    holds the image ``c`` times. NaN for a row without positive or without negative weight.
    """
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order]
    w_sorted = w[:, order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    pos_w = np.add.reduceat(w_sorted * y_sorted, starts, axis=1)
    neg_w = np.add.reduceat(w_sorted * ~y_sorted, starts, axis=1)
    neg_below = np.cumsum(neg_w, axis=1) - neg_w
    num = (pos_w * (neg_below + 0.5 * neg_w)).sum(axis=1)
    den = pos_w.sum(axis=1) * neg_w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_aucs(
    labels: np.ndarray,
    probs: np.ndarray,
    patient_ids: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    known: np.ndarray | None = None,
) -> np.ndarray:
    """Per-finding AUC of ``n_boot`` patient-level bootstrap resamples, ``float64[n_boot, K]``.

    ``known`` ([N, K], 0/1): a finding's AUC uses only the images whose label for it is known.

    Each resample draws as many patients as there are, with replacement, and keeps all images of
    every drawn patient (as many times as the patient is drawn). NaN where a resample has a single
    class for a finding.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    patient_ids = np.asarray(patient_ids)
    if labels.shape != probs.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape} and probs {probs.shape} must both be [N, K]")
    if patient_ids.shape != (labels.shape[0],):
        raise ValueError(f"patient_ids {patient_ids.shape} must be [N] with N = {labels.shape[0]}")
    if n_boot < 1:
        raise ValueError("n_boot must be at least 1")
    n, k = labels.shape
    y = labels.astype(bool)
    out = np.full((n_boot, k), np.nan)
    from cxrflow.resample import patient_resamples

    patient_of_image, chunks = patient_resamples(patient_ids, n_boot, seed)
    for start, counts in chunks:
        b = counts.shape[0]
        weights = counts[:, patient_of_image].astype(np.float64)
        for j in range(k):
            w = weights if known is None else weights * np.asarray(known)[:, j]
            out[start : start + b, j] = _weighted_auc(y[:, j], probs[:, j], w)
    return out


def _interval(values: np.ndarray, level: float) -> list[float] | None:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return None
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def bootstrap_auc_ci(
    labels: np.ndarray,
    probs: np.ndarray,
    patient_ids: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    known: np.ndarray | None = None,
) -> dict[str, Any]:
    """Percentile bootstrap intervals (resampling patients) of each finding's AUC and of the mean.

    Returns ``{"auc_ci": [K] of [lo, hi] or None, "mean_auc_ci": [lo, hi] or None, "n_boot": n}``.
    A finding without an AUC on the full data (one class only) gets None and is left out of the
    mean in every resample, so the mean's interval is over the same findings as the point estimate.
    Resamples in which a finding happens to have one class are dropped for that finding.
    """
    labels = np.asarray(labels)
    point = per_class_auc(labels, probs, known)
    valid = ~np.isnan(point)
    boots = bootstrap_aucs(labels, probs, patient_ids, n_boot=n_boot, seed=seed, known=known)
    per_finding = [_interval(boots[:, j], level) if valid[j] else None for j in range(labels.shape[1])]
    if valid.any():
        sub = boots[:, valid]
        has_any = ~np.isnan(sub).all(axis=1)
        means = np.full(n_boot, np.nan)
        means[has_any] = np.nanmean(sub[has_any], axis=1)
        mean_ci = _interval(means, level)
    else:
        mean_ci = None
    return {"auc_ci": per_finding, "mean_auc_ci": mean_ci, "n_boot": int(n_boot)}


# --------------------------------------------------------------------------------------------------
# operating points


def youden_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The probability threshold maximising Youden's J = sensitivity + specificity - 1.

    An image is called positive when its probability is ``>= threshold``; candidates are the
    observed probabilities. Among equally good thresholds the highest (most specific) wins.
    NaN when the labels take one value only.
    """
    y = np.asarray(labels).astype(bool).ravel()
    if y.all() or not y.any():
        return float("nan")
    fpr, tpr, thresholds = roc(y, probs)
    best = 1 + int(np.argmax(tpr[1:] - fpr[1:]))  # skip (0, 0) at inf; first maximum = highest threshold
    return float(thresholds[best])


def sensitivity_specificity(labels: np.ndarray, probs: np.ndarray, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) when ``probs >= threshold`` is called positive; NaN where undefined."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(probs, dtype=np.float64).ravel()
    if np.isnan(threshold):
        return float("nan"), float("nan")
    called = s >= threshold
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    sens = float((called & y).sum() / n_pos) if n_pos else float("nan")
    spec = float((~called & ~y).sum() / n_neg) if n_neg else float("nan")
    return sens, spec


# --------------------------------------------------------------------------------------------------
# the metrics dictionary


def json_number(x: float) -> float | None:
    """JSON-safe number: NaN becomes None (``null``)."""
    return None if x is None or np.isnan(x) else float(x)


def summarize(
    labels: np.ndarray,
    probs: np.ndarray,
    patient_ids: np.ndarray,
    label_names: Sequence[str],
    thresholds: np.ndarray | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    known: np.ndarray | None = None,
) -> dict[str, Any]:
    """The evaluation of one split as a JSON-ready dict (the core of ``metrics.json``).

    ``known`` ([N, K], 0/1, None: all known): each finding's AUC, interval, positives and
    sensitivity/specificity use the images whose label for it is known; ``excluded_unknown`` counts
    the others.

    ``thresholds`` ([K], normally from :func:`youden_threshold` on the validation split) give the
    per-finding sensitivity and specificity; without them those entries are omitted.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    names = list(label_names)
    if labels.shape[1] != len(names):
        raise ValueError(f"{labels.shape[1]} label columns but {len(names)} label names")
    aucs = per_class_auc(labels, probs, known)
    ci = bootstrap_auc_ci(labels, probs, patient_ids, n_boot=n_boot, seed=seed, known=known)
    mask = np.ones(labels.shape, dtype=bool) if known is None else np.asarray(known).astype(bool)
    positives = (labels.astype(bool) & mask).sum(axis=0)
    nan_findings = [n for n, a in zip(names, aucs) if np.isnan(a)]
    result: dict[str, Any] = {
        "label_names": names,
        "n_images": int(labels.shape[0]),
        "n_patients": int(np.unique(np.asarray(patient_ids)).size),
        "mean_auc": json_number(mean_auc(aucs)),
        "mean_auc_ci95": ci["mean_auc_ci"],
        "n_findings_in_mean": int(len(names) - len(nan_findings)),
        "auc": {n: json_number(a) for n, a in zip(names, aucs)},
        "auc_ci95": dict(zip(names, ci["auc_ci"])),
        "positives": {n: int(p) for n, p in zip(names, positives)},
        "nan_findings": nan_findings,
        "nan_findings_reason": (
            "no AUC: the split holds only one label value (no positives or no negatives) for these "
            "findings; they are left out of mean_auc and its interval"
        ),
        "bootstrap": {"n_boot": ci["n_boot"], "seed": int(seed), "unit": "patient", "interval": "percentile 95%"},
    }
    if thresholds is not None:
        thresholds = np.asarray(thresholds, dtype=np.float64)
        sens_spec = [
            sensitivity_specificity(labels[mask[:, j], j], probs[mask[:, j], j], thresholds[j])
            for j in range(len(names))
        ]
        result["threshold"] = {n: json_number(t) for n, t in zip(names, thresholds)}
        result["sensitivity"] = {n: json_number(ss[0]) for n, ss in zip(names, sens_spec)}
        result["specificity"] = {n: json_number(ss[1]) for n, ss in zip(names, sens_spec)}
    if known is not None:
        result["excluded_unknown"] = {n: int(x) for n, x in zip(names, (~mask).sum(axis=0))}
    return result
