"""Compiled bootstrap loops: group and rest AUCs of one finding (the subgroup audit) and average
precision (the evaluation's AUPRC interval), under many resamples.

One pass per resample over the images in score order (ties in blocks, counted half) keeps, for every
group of every attribute at once, the weight of negatives seen so far; so one pass gives each group's
concordant pairs, its pairs with the whole split and, by subtraction, the pairs of the rest:
``C(rest, rest) = C(all, all) - C(g, all) - C(all, g) + C(g, g)``. A resample weighs each image by
how often its patient was drawn (:func:`cxrflow.resample.patient_resamples`). Compiled with
numba (cached on disk where numba can write its cache); imported only by :mod:`cxrflow.results.audit` when an audit runs.
"""

from __future__ import annotations

import numpy as np
from numba import njit


def _group_and_rest_aucs(counts, patient, positive, block_starts, columns, n_columns):  # pragma: no cover - compiled
    """``counts[b, P]`` patient draws; ``patient[n]``, ``positive[n]`` and ``columns[A, n]`` (each
    image's group column under each attribute) of the finding's images in score order;
    ``block_starts`` the tie blocks (ending with n). Returns (group AUC, rest AUC), ``float64[b, G]``."""
    b = counts.shape[0]
    n_att = columns.shape[0]
    n_blocks = block_starts.shape[0] - 1
    group = np.full((b, n_columns), np.nan)
    rest = np.full((b, n_columns), np.nan)
    for r in range(b):
        neg_below = np.zeros(n_columns)
        neg_block = np.zeros(n_columns)
        pos_g = np.zeros(n_columns)
        neg_g = np.zeros(n_columns)
        c_gg = np.zeros(n_columns)
        c_g_all = np.zeros(n_columns)
        s_g = np.zeros(n_columns)
        all_neg_below = 0.0
        all_pos_below = 0.0
        c_all = 0.0
        for k in range(n_blocks):
            start, stop = block_starts[k], block_starts[k + 1]
            pb = 0.0
            nb = 0.0
            for i in range(start, stop):
                w = counts[r, patient[i]]
                if w == 0:
                    continue
                if positive[i]:
                    pb += w
                else:
                    nb += w
                    for a in range(n_att):
                        neg_block[columns[a, i]] += w
            for i in range(start, stop):
                w = counts[r, patient[i]]
                if w == 0:
                    continue
                if positive[i]:
                    below = all_neg_below + 0.5 * nb
                    c_all += w * below
                    for a in range(n_att):
                        g = columns[a, i]
                        c_gg[g] += w * (neg_below[g] + 0.5 * neg_block[g])
                        c_g_all[g] += w * below
                        pos_g[g] += w
                else:
                    for a in range(n_att):
                        g = columns[a, i]
                        s_g[g] += w * (all_pos_below + 0.5 * pb)
                        neg_g[g] += w
            for i in range(start, stop):
                if not positive[i]:
                    for a in range(n_att):
                        g = columns[a, i]
                        neg_below[g] += neg_block[g]
                        neg_block[g] = 0.0
            all_neg_below += nb
            all_pos_below += pb
        total_pos = all_pos_below
        total_neg = all_neg_below
        for g in range(n_columns):
            den = pos_g[g] * neg_g[g]
            if den > 0:
                group[r, g] = c_gg[g] / den
            rest_den = (total_pos - pos_g[g]) * (total_neg - neg_g[g])
            if rest_den > 0:
                c_all_g = neg_g[g] * total_pos - s_g[g]
                rest[r, g] = (c_all - c_g_all[g] - c_all_g + c_gg[g]) / rest_den
    return group, rest


def _average_precisions(counts, patient, positive, block_starts):  # pragma: no cover - compiled
    """Average precision under each row of ``counts[b, P]``; the images in descending score order
    with their tie blocks (each block one step, as scikit-learn's). NaN without positive weight."""
    b = counts.shape[0]
    out = np.full(b, np.nan)
    for r in range(b):
        tp = 0.0
        seen = 0.0
        total = 0.0
        for k in range(block_starts.shape[0] - 1):
            gained = 0.0
            for i in range(block_starts[k], block_starts[k + 1]):
                w = counts[r, patient[i]]
                seen += w
                if positive[i]:
                    gained += w
            tp += gained
            if gained > 0:
                total += (tp / seen) * gained
        if tp > 0:
            out[r] = total / tp
    return out


try:  # compiled once and kept in numba's cache (beside the module, else the user's cache folder)
    group_and_rest_aucs = njit(cache=True)(_group_and_rest_aucs)
    average_precisions = njit(cache=True)(_average_precisions)
except RuntimeError:  # nowhere to write a cache: compiled in every process (a few seconds)
    group_and_rest_aucs = njit(cache=False)(_group_and_rest_aucs)
    average_precisions = njit(cache=False)(_average_precisions)
