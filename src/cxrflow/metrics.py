"""Ranking metrics over a whole epoch or split.

Per-finding ROC AUC is computed over all samples at once (never averaged over batches). A finding
whose labels take one value only has no AUC: it is NaN and left out of the mean. ROC curves and
AUC come from :mod:`sklearn.metrics`; this module only adds the NaN convention and the per-finding
loop (the patient bootstrap, which no library offers, is in :mod:`cxrflow.results.evaluate`).
"""

from __future__ import annotations

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
