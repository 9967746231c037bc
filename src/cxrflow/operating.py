"""What an evaluation reports beside the AUC: prevalence, AUPRC and the operating point's counts.

:func:`operating_report` adds to ``metrics.json``, per finding: the test prevalence, the average
precision (AUPRC, as :func:`sklearn.metrics.average_precision_score`) with a 95% interval, and at
the operating threshold the TP/FP/FN/TN counts and sensitivity and specificity with 95% intervals;
the intervals come from the evaluation's own patient resamples
(:func:`cxrflow.resample.patient_resamples`). :func:`plot_pr` draws the precision-recall
curves that go beside the ROC curves (``pr.png``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PR_NAME = "pr.png"


def weighted_average_precision(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision of one finding under each row of image weights ``w[B, N]`` (tied scores
    form one step, as in scikit-learn); NaN for a row without positive weight."""
    order = np.argsort(-s, kind="mergesort")
    s_o, y_o = s[order], y[order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, s_o[1:] != s_o[:-1]])
    w_o = w[:, order]
    tp = np.cumsum(np.add.reduceat(w_o * y_o, starts, axis=1), axis=1)
    seen = np.cumsum(np.add.reduceat(w_o, starts, axis=1), axis=1)
    total = tp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(seen > 0, tp / np.where(seen > 0, seen, 1), 0.0)
        gained = np.diff(np.concatenate([np.zeros((len(w), 1)), tp], axis=1), axis=1)
        return np.where(total[:, 0] > 0, (precision * gained).sum(axis=1) / total[:, 0], np.nan)


def resampled_average_precision(y: np.ndarray, s: np.ndarray, patient: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """:func:`weighted_average_precision` with image weights ``counts[:, patient]``, compiled (one pass per resample)."""
    from cxrflow import auditkernel

    order = np.argsort(-s, kind="mergesort")
    s_o = s[order]
    starts = np.flatnonzero(np.r_[True, s_o[1:] != s_o[:-1]]) if order.size else np.zeros(0, np.int64)
    return auditkernel.average_precisions(np.ascontiguousarray(counts, dtype=np.int64), patient[order].astype(np.int64),
                                          y[order].astype(np.bool_), np.r_[starts, order.size].astype(np.int64))  # fmt: skip


def _interval(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    return None if values.size == 0 else [float(v) for v in np.percentile(values, [2.5, 97.5])]


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def operating_report(
    labels: np.ndarray,
    probs: np.ndarray,
    patient_ids: np.ndarray,
    label_names: Sequence[str],
    thresholds: Sequence[float] | None,
    *,
    known: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """``prevalence``, ``auprc``, ``auprc_ci95``, ``counts`` ({tp, fp, fn, tn}), ``sensitivity_ci95`` and
    ``specificity_ci95`` per finding (counts and intervals only with ``thresholds``)."""
    from cxrflow.resample import patient_resamples

    y = np.asarray(labels) > 0.5
    p = np.asarray(probs, dtype=np.float64)
    mask = np.ones(y.shape, bool) if known is None else np.asarray(known) > 0.5
    k = y.shape[1]
    t = np.full(k, np.nan) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        called = p >= t[None, :]
    cells = {"tp": called & y, "fp": called & ~y, "fn": ~called & y, "tn": ~called & ~y}
    cells = {key: value & mask for key, value in cells.items()}
    ones = np.ones((1, len(y)))
    point = np.array(
        [weighted_average_precision(y[mask[:, j], j], p[mask[:, j], j], ones[:, mask[:, j]])[0] for j in range(k)]
    )
    boot_ap = np.full((n_boot, k), np.nan)
    stacked = np.concatenate([cells[c] for c in ("tp", "fp", "fn", "tn")], axis=1).astype(np.float64)
    boot_cells = np.zeros((n_boot, 4 * k))
    patient_of_image, chunks = patient_resamples(patient_ids, n_boot, seed)
    for start, counts in chunks:
        rows = slice(start, start + len(counts))
        boot_cells[rows] = counts[:, patient_of_image].astype(np.float64) @ stacked
        for j in range(k):
            m = mask[:, j]
            boot_ap[rows, j] = resampled_average_precision(y[m, j], p[m, j], patient_of_image[m], counts)
    tp, fp, fn, tn = (boot_cells[:, i * k : (i + 1) * k] for i in range(4))
    with np.errstate(invalid="ignore", divide="ignore"):
        sens_b, spec_b = tp / (tp + fn), tn / (tn + fp)
    names = list(label_names)
    result: dict[str, Any] = {
        "prevalence": {
            n: _num(float(y[mask[:, j], j].mean()) if mask[:, j].any() else math.nan) for j, n in enumerate(names)
        },
        "auprc": {n: _num(a) for n, a in zip(names, point)},
        "auprc_ci95": {n: _interval(boot_ap[:, j]) for j, n in enumerate(names)},
    }
    if thresholds is not None:
        result["counts"] = {n: {c: int(cells[c][:, j].sum()) for c in cells} for j, n in enumerate(names)}
        result["sensitivity_ci95"] = {n: _interval(sens_b[:, j]) for j, n in enumerate(names)}
        result["specificity_ci95"] = {n: _interval(spec_b[:, j]) for j, n in enumerate(names)}
    return result


def plot_pr(
    labels: np.ndarray,
    probs: np.ndarray,
    label_names: Sequence[str],
    *,
    auprc: Sequence[float | None] | None = None,
    title: str = "Precision-recall curves per finding",
    ax: Axes | None = None,
) -> Figure:
    """One precision-recall curve per finding, its AUPRC and prevalence (the chance level) in the legend."""
    from sklearn.metrics import precision_recall_curve

    from cxrflow.plots import LINE_STYLES, OKABE_ITO

    labels = np.asarray(labels) > 0.5
    if ax is None:
        fig = Figure(figsize=(7.5, 7.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
    fig = ax.figure
    for j, name in enumerate(label_names):
        colour, style = OKABE_ITO[j % len(OKABE_ITO)], LINE_STYLES[(j // len(OKABE_ITO)) % len(LINE_STYLES)]
        y = labels[:, j]
        if not y.any():
            ax.plot([], [], color=colour, ls=style, label=f"{name} (no positives)")
            continue
        precision, recall, _ = precision_recall_curve(y, np.asarray(probs)[:, j])
        value = None if auprc is None else auprc[j]
        text = "n/a" if value is None else f"{value:.3f}"
        ax.plot(
            recall, precision, color=colour, ls=style, lw=1.3, label=f"{name} (AUPRC {text}, prevalence {y.mean():.3f})"
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.005)
    ax.set_xlabel("Recall = sensitivity (fraction of positives found)")
    ax.set_ylabel("Precision = positive predictive value (fraction of calls that are right)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=7, framealpha=0.85)
    return fig
