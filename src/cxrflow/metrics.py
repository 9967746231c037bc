"""Ranking metrics over a whole epoch or split.

Per-finding ROC AUC is computed over all samples at once (never averaged over batches). A finding
whose labels take one value only has no AUC: it is NaN and left out of the mean.
"""

from __future__ import annotations

import numpy as np


def binary_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC of one finding (Mann-Whitney U with mid-ranks for ties); NaN with one class only."""
    y_true = np.asarray(y_true).astype(bool).ravel()
    y_score = np.asarray(y_score, dtype=np.float64).ravel()
    n_pos = int(y_true.sum())
    n_neg = y_true.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(y_score, kind="mergesort")
    sorted_scores = y_score[order]
    ranks = np.empty(y_score.size, dtype=np.float64)
    # mid-ranks for ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    mid = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(mid, counts)
    u = ranks[y_true].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


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
