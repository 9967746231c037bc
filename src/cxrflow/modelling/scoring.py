"""Scoring a split's predictions into an evaluation: the step ``cxrflow evaluate`` and ``cxrflow
ensemble`` share.

- :func:`score_with_calibration`: the metrics of the evaluated split with everything fitted on the
  validation split (Youden thresholds, per-finding temperatures, :mod:`cxrflow.modelling.calibration`).
- :func:`write_prediction_files`: ``predictions.parquet``, ``val_predictions.parquet``, ``roc.png``
  and ``reliability.png`` of an evaluation folder (:mod:`cxrflow.runs`).
- :func:`format_summary`: an evaluation's ``metrics.json`` as a few lines for the terminal.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrflow.metrics import json_number, summarize, youden_threshold
from cxrflow.modelling.calibration import apply_temperatures, calibration_report, fit_temperatures
from cxrflow.names import printable
from cxrflow.operating import operating_report
from cxrflow.runs import PREDICTIONS_NAME, RELIABILITY_NAME, VAL_PREDICTIONS_NAME, predictions_table


def score_with_calibration(
    evaluated: dict,
    validation: dict,
    label_names: Sequence[str],
    *,
    logit_offsets: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    known: bool = False,
) -> dict[str, Any]:
    """The metrics of ``evaluated`` (a :func:`~cxrflow.modelling.inference.predict_split`-style dict with
    ``logits``) with everything fitted on ``validation``: Youden thresholds on the raw and on the
    calibrated probabilities, and per-finding temperatures (of the logits less ``logit_offsets``,
    the ``log pos_weight`` shift of the training loss); adds ``calprobs`` to both dicts.

    AUCs, intervals and sensitivity/specificity are of the raw probabilities (temperature scaling
    keeps each finding's ranking, so the calibrated ones give the same); ``threshold_calibrated``
    is the same operating point on the calibrated scale, for ``cxrflow predict``. With ``known``
    (a store with label states) every fit and metric uses each finding's known labels only (the
    dicts' ``known`` masks) and the metrics report the exclusions.
    """
    k = len(label_names)
    val_labels = np.asarray(validation["labels"])
    val_probs = np.asarray(validation["probs"], dtype=np.float64)
    vk = (
        np.ones(val_labels.shape, bool)
        if validation.get("known") is None
        else np.asarray(validation["known"]).astype(bool)
    )
    thresholds = np.array([youden_threshold(val_labels[vk[:, j], j], val_probs[vk[:, j], j]) for j in range(k)])
    offsets = np.zeros(k) if logit_offsets is None else np.asarray(logit_offsets, dtype=np.float64)
    temperatures = fit_temperatures(np.asarray(validation["logits"], dtype=np.float64) - offsets, val_labels, vk)
    for pred in (validation, evaluated):  # one dict when the evaluated split is val
        pred["calprobs"] = apply_temperatures(pred["logits"], temperatures, offsets).astype(np.float32)
    val_cal = np.asarray(validation["calprobs"], dtype=np.float64)
    cal_thresholds = [youden_threshold(val_labels[vk[:, j], j], val_cal[:, j][vk[:, j]]) for j in range(k)]
    labels = np.asarray(evaluated["labels"])
    probs = np.asarray(evaluated["probs"], dtype=np.float64)
    mask = np.asarray(evaluated["known"]) if known and evaluated.get("known") is not None else None
    metrics = summarize(
        labels, probs, evaluated["patient_id"], label_names, thresholds, n_boot=n_boot, seed=seed, known=mask
    )
    metrics.update(
        operating_report(
            labels, probs, evaluated["patient_id"], label_names, thresholds, known=mask, n_boot=n_boot, seed=seed
        )
    )
    metrics["threshold_split"] = "val"
    metrics["threshold_calibrated"] = {n: json_number(t) for n, t in zip(label_names, cal_thresholds)}
    metrics["calibration"] = calibration_report(
        temperatures, labels, probs, evaluated["calprobs"], label_names, offsets=offsets, known=mask
    )
    return metrics


def write_prediction_files(
    folder: Path, evaluated: dict, validation: dict, label_names: Sequence[str], metrics: dict, what: str
) -> list[str]:
    """Write ``predictions.parquet``, ``val_predictions.parquet``, ``roc.png`` and ``reliability.png``
    into ``folder``; returns the figures' names. ``what`` names the model in the titles."""
    import pyarrow.parquet as pq

    from cxrflow.modelling.calibration import expected_calibration_error as ece
    from cxrflow.operating import PR_NAME, plot_pr
    from cxrflow.plots import plot_reliability, plot_roc

    pq.write_table(predictions_table(evaluated, label_names), folder / PREDICTIONS_NAME)
    pq.write_table(predictions_table(validation, label_names), folder / VAL_PREDICTIONS_NAME)
    labels = np.asarray(evaluated["labels"])
    split = metrics.get("split", "test")
    aucs = [metrics["auc"][n] for n in label_names]
    plot_roc(labels, evaluated["probs"], label_names, aucs=aucs, title=f"ROC curves, {what}, {split} split").savefig(
        folder / "roc.png", dpi=110
    )
    auprc = [(metrics.get("auprc") or {}).get(n) for n in label_names]
    plot_pr(labels, evaluated["probs"], label_names, auprc=auprc, title=f"Precision-recall curves, {what}, {split} split").savefig(
        folder / PR_NAME, dpi=110)  # fmt: skip
    bins = metrics["calibration"]["bins"]
    known = np.ones(labels.shape, bool) if evaluated.get("known") is None else np.asarray(evaluated["known"]) > 0
    pooled = {
        key: ece(labels[known], np.asarray(evaluated[key], dtype=np.float64)[known], bins)
        for key in ("probs", "calprobs")
    }
    curves = {  # the ECE beside each curve is of the same pooled pairs and bins as the curve
        f"raw (pooled ECE {pooled['probs']:.3f})": evaluated["probs"],
        f"temperature-scaled on val (pooled ECE {pooled['calprobs']:.3f})": evaluated["calprobs"],
    }
    title = f"Reliability, {what}, {split} split\nall {labels.shape[1]} findings pooled: every (image, finding) pair with a known label"
    plot_reliability(labels, curves, bins=bins, title=title, mask=known).savefig(folder / RELIABILITY_NAME, dpi=110)
    return ["roc.png", PR_NAME, RELIABILITY_NAME]


def format_summary(metrics: dict) -> str:
    """A few lines for the terminal: mean AUC with CI, then one line per finding."""
    ci = metrics.get("mean_auc_ci95")
    ci_text = f" (95% CI {ci[0]:.4f}-{ci[1]:.4f}, patient bootstrap)" if ci else ""
    mean = metrics.get("mean_auc")
    wide = max([20, *(len(printable(n)) for n in metrics["label_names"])])  # "Enlarged Cardiomediastinum" is 26
    lines = [
        (
            f"{metrics.get('model')} {metrics.get('size')}px {metrics.get('checkpoint')} on {metrics.get('split')}: "
            f"{metrics['n_images']} images, {metrics['n_patients']} patients"
        ),
        f"mean AUC {'n/a' if mean is None else f'{mean:.4f}'}{ci_text} over {metrics['n_findings_in_mean']} findings",
        f"{'finding':<{wide}} {'pos':>6} {'AUC':>7}  {'95% CI':<15} {'thresh':>7} {'sens':>6} {'spec':>6}",
    ]

    def f(x: float | None, d: int = 3) -> str:
        return "n/a" if x is None else f"{x:.{d}f}"

    for n in metrics["label_names"]:
        c = metrics["auc_ci95"].get(n)
        lines.append(
            f"{printable(n):<{wide}} {metrics['positives'][n]:>6} {f(metrics['auc'][n]):>7}  "
            f"{(f'{c[0]:.3f}-{c[1]:.3f}' if c else 'n/a'):<15} {f(metrics.get('threshold', {}).get(n)):>7} "
            f"{f(metrics.get('sensitivity', {}).get(n)):>6} {f(metrics.get('specificity', {}).get(n)):>6}"
        )
    if metrics.get("nan_findings"):
        lines.append(f"no AUC (one class in the split, left out of the mean): {', '.join(metrics['nan_findings'])}")
    cal = metrics.get("calibration")
    if cal and cal["ece_mean"]["before"] is not None:
        lines.append(
            f"calibration (temperature per finding, fitted on {cal['fitted_on']}): mean ECE {cal['ece_mean']['before']:.4f} -> "
            f"{cal['ece_mean']['after']:.4f}, mean Brier {cal['brier_mean']['before']:.4f} -> {cal['brier_mean']['after']:.4f}"
        )
    return "\n".join(map(printable, lines))  # names and folders are data: never terminal controls
