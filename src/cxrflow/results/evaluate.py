"""Evaluation of a trained run on one split: AUC with patient-level bootstrap CIs, operating points.

The pure core works on arrays (labels ``[N, K]``, probabilities ``[N, K]``, patient ids ``[N]``):

- :func:`bootstrap_aucs` / :func:`bootstrap_auc_ci`: 95% percentile bootstrap intervals of the
  per-finding AUC and of the mean AUC, resampling *patients* with replacement (images of one patient
  are not independent, so resampling images would give intervals that are too narrow).
- :func:`youden_threshold` / :func:`sensitivity_specificity`: a decision threshold per finding chosen
  on the validation split (Youden's J), and the sensitivity and specificity it gives on the evaluated
  split.
- :func:`summarize`: everything above as the ``metrics.json`` dictionary.

:func:`evaluate_run` runs a checkpoint over the validation and evaluated splits and writes, into one
folder (by default ``RUN/eval-<split>-<checkpoint>/``, e.g. ``RUN/eval-test-best_finetune/``):
``metrics.json``, ``predictions.parquet`` (``image_id``, ``patient_id``, ``prob_<finding>``,
``label_<finding>``, ``logit_<finding>``, ``calprob_<finding>``), ``val_predictions.parquet`` (the
same for the validation split), ``roc.png``, ``reliability.png`` and ``curves.png``. Probabilities
are also calibrated by per-finding temperature scaling fitted on the validation logits
(:mod:`cxrflow.modelling.calibration`; ``metrics.json["calibration"]``). ``cxrflow report`` reads those folders,
``cxrflow ensemble`` combines them.

An evaluation belongs to one checkpoint: ``metrics.json`` records its ``checkpoint_sha256`` (with
its stage and epoch), and :func:`evaluation_status` is the one check every later consumer (report,
predict's thresholds, ensembles, ...) makes before using it. The model's inputs are normalised with
the pixel statistics recorded in the checkpoint, and the store's splits must be the ones the run was
trained with (:func:`check_store_identity`).
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cxrflow import __version__
from cxrflow.atomic import write_json_atomic
from cxrflow import safeio
from cxrflow.errors import CxrflowError
from cxrflow import options
from cxrflow.results.metrics import mean_auc, per_class_auc, roc
from cxrflow.outputs import publishing
from cxrflow.tracking import add_arguments as add_tracking_arguments
from cxrflow.tracking import log_evaluation, request_from_args

#: Checkpoint names a run folder may hold, in the order evaluate prefers them by default.
CHECKPOINT_NAMES = ("best_finetune", "best_kt")
#: Stage each named checkpoint belongs to.
CHECKPOINT_STAGE = {"best_finetune": "finetune", "best_kt": "kt"}
METRICS_NAME = "metrics.json"
PREDICTIONS_NAME = "predictions.parquet"
#: The validation split's predictions, same columns (ensembles are fitted on them without inference).
VAL_PREDICTIONS_NAME = "val_predictions.parquet"
RELIABILITY_NAME = "reliability.png"

# Bootstrap replicates are processed in chunks holding about this many weights at once.
_CHUNK_WEIGHTS = 8_000_000


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
    _, patient_of_image = np.unique(patient_ids, return_inverse=True)
    n_patients = int(patient_of_image.max()) + 1 if n else 0
    rng = np.random.default_rng(seed)
    y = labels.astype(bool)
    out = np.full((n_boot, k), np.nan)
    chunk = max(1, min(n_boot, _CHUNK_WEIGHTS // max(n, n_patients, 1)))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draws = rng.integers(0, n_patients, size=(b, n_patients))
        flat = (draws + np.arange(b)[:, None] * n_patients).ravel()
        counts = np.bincount(flat, minlength=b * n_patients).reshape(b, n_patients)
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


def _num(x: float) -> float | None:
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
        "mean_auc": _num(mean_auc(aucs)),
        "mean_auc_ci95": ci["mean_auc_ci"],
        "n_findings_in_mean": int(len(names) - len(nan_findings)),
        "auc": {n: _num(a) for n, a in zip(names, aucs)},
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
        sens_spec = [sensitivity_specificity(labels[mask[:, j], j], probs[mask[:, j], j], thresholds[j])
                     for j in range(len(names))]
        result["threshold"] = {n: _num(t) for n, t in zip(names, thresholds)}
        result["sensitivity"] = {n: _num(ss[0]) for n, ss in zip(names, sens_spec)}
        result["specificity"] = {n: _num(ss[1]) for n, ss in zip(names, sens_spec)}
    if known is not None:
        result["excluded_unknown"] = {n: int(x) for n, x in zip(names, (~mask).sum(axis=0))}
    return result


# --------------------------------------------------------------------------------------------------
# a run folder


def resolve_checkpoint(run: str | os.PathLike, checkpoint: str | None = None) -> tuple[str, Path]:
    """(name, path) of the checkpoint to evaluate.

    ``checkpoint`` is ``best_finetune``, ``best_kt``, a file path, or None for the default:
    ``best_finetune`` when the run has it, else ``best_kt``.
    """
    run = Path(run)
    if checkpoint in (None, "", "auto"):
        for name in CHECKPOINT_NAMES:
            if (run / f"{name}.pt").is_file():
                return name, run / f"{name}.pt"
        raise CxrflowError(
            f"no checkpoint to evaluate (expected {' or '.join(n + '.pt' for n in CHECKPOINT_NAMES)}; "
            "has 'cxrflow train' finished a stage?)",
            run,
        )
    if checkpoint in CHECKPOINT_NAMES or checkpoint == "last":
        path = run / f"{checkpoint}.pt"
        if not path.is_file():
            have = sorted(p.stem for p in run.glob("*.pt"))
            raise CxrflowError(f"the run has no {checkpoint}.pt (it has: {', '.join(have) or 'no checkpoints'})", run)
        return checkpoint, path
    path = Path(checkpoint)
    if not path.is_file():
        raise CxrflowError(
            f"no such checkpoint (give {', '.join(CHECKPOINT_NAMES)}, last, or a .pt file)", path
        )
    return path.stem, path


def default_eval_dir(run: str | os.PathLike, split: str, checkpoint_name: str) -> Path:
    """Where ``cxrflow evaluate`` writes by default: ``RUN/eval-<split>-<checkpoint>``."""
    return Path(run) / f"eval-{split}-{checkpoint_name}"


def check_metrics(m: Any, path: str | os.PathLike) -> dict:
    """``m`` (a parsed ``metrics.json``) if it has the shape readers rely on, else one CxrflowError
    naming the file and the field."""

    def number(x: Any) -> bool:
        return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x))

    if not isinstance(m, dict):
        raise CxrflowError(f"not a cxrflow evaluation: expected a JSON object, got {type(m).__name__}", path)
    for key in ("mean_auc", "auc", "label_names"):
        if key not in m:
            raise CxrflowError(f"not a cxrflow evaluation: key {key!r} is missing", path)
    names = m["label_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CxrflowError("metrics field 'label_names' must be a list of finding names", path)
    if not number(m["mean_auc"]):
        raise CxrflowError(f"metrics field 'mean_auc' must be a number or null, got {m['mean_auc']!r}", path)
    for key in ("auc", "threshold"):
        value = m.get(key, {})
        if not isinstance(value, dict) or not all(number(v) for v in value.values()):
            raise CxrflowError(f"metrics field {key!r} must map findings to numbers or null", path)
    ci = m.get("mean_auc_ci95")
    if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(number(v) for v in ci)):
        raise CxrflowError(f"metrics field 'mean_auc_ci95' must be [low, high] or null, got {ci!r}", path)
    members = m.get("members")
    if m.get("kind") == "ensemble" and not (
        isinstance(members, list) and all(isinstance(x, dict) and isinstance(x.get("run"), str) and isinstance(x.get("eval"), str) for x in members)
    ):
        raise CxrflowError(f"metrics field 'members' of an ensemble must be a list of objects with 'run' and 'eval' folders, got {members!r}"[:240], path)
    size = m.get("size")
    sizes = size if m.get("kind") == "ensemble" and isinstance(size, list) else [size]  # an ensemble's members' sizes
    if size is not None and not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        raise CxrflowError(f"metrics field 'size' must be an integer, got {size!r}", path)
    return m


def read_epoch_records(run: str | os.PathLike) -> list[dict]:
    """The epoch records of ``RUN/metrics.jsonl``; a line cut short by a crash is skipped."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():  # bad bytes: a line that does not parse
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "stage" in rec and "epoch" in rec:
            records.append(rec)
    return records


def predictions_table(pred: dict, label_names: Sequence[str]):
    """``predictions.parquet`` content: image_id, patient_id, prob_<finding> ..., label_<finding> ...,
    then logit_<finding> ... and calprob_<finding> ... when ``pred`` has ``logits`` / ``calprobs``, and,
    when some labels are not known, known_<finding> (uint8 0/1)."""
    import pyarrow as pa

    probs = np.asarray(pred["probs"], dtype=np.float32)
    labels = np.asarray(pred["labels"])
    cols: dict[str, Any] = {
        "image_id": pa.array(list(pred["image_id"]), pa.string()),
        "patient_id": pa.array(np.asarray(pred["patient_id"], dtype=np.int64)),
    }
    for j, name in enumerate(label_names):
        cols[f"prob_{name}"] = pa.array(probs[:, j])
    for j, name in enumerate(label_names):
        cols[f"label_{name}"] = pa.array(labels[:, j].round().astype(np.uint8))
    for key, prefix in (("logits", "logit_"), ("calprobs", "calprob_")):
        if pred.get(key) is not None:
            values = np.asarray(pred[key], dtype=np.float32)
            for j, name in enumerate(label_names):
                cols[f"{prefix}{name}"] = pa.array(values[:, j])
    known = pred.get("known")
    if known is not None and not np.asarray(known).all():
        for j, name in enumerate(label_names):
            cols[f"known_{name}"] = pa.array(np.asarray(known)[:, j].round().astype(np.uint8))
    return pa.table(cols)


def read_predictions(path: str | os.PathLike) -> tuple[dict, list[str]]:
    """Read ``predictions.parquet`` (or ``val_predictions.parquet``) back into (predict_split-style
    dict, label names); ``logits`` and ``calprobs`` are there when the file has those columns."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    names = [c[len("prob_") :] for c in table.column_names if c.startswith("prob_")]
    frame = table.to_pandas()
    pred = {
        "image_id": frame["image_id"].tolist(),
        "patient_id": frame["patient_id"].to_numpy(np.int64),
        "probs": frame[[f"prob_{n}" for n in names]].to_numpy(np.float64),
        "labels": frame[[f"label_{n}" for n in names]].to_numpy(np.float64),
    }
    for key, prefix in (("logits", "logit_"), ("calprobs", "calprob_")):
        if all(f"{prefix}{n}" in frame for n in names):
            pred[key] = frame[[f"{prefix}{n}" for n in names]].to_numpy(np.float64)
    if names and f"known_{names[0]}" in frame.columns:
        pred["known"] = frame[[f"known_{n}" for n in names]].to_numpy(np.float64)
    return pred, names


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
    from cxrflow.modelling.calibration import apply_temperatures, calibration_report, fit_temperatures

    k = len(label_names)
    val_labels = np.asarray(validation["labels"])
    val_probs = np.asarray(validation["probs"], dtype=np.float64)
    vk = np.ones(val_labels.shape, bool) if validation.get("known") is None else np.asarray(validation["known"]).astype(bool)
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
    metrics = summarize(labels, probs, evaluated["patient_id"], label_names, thresholds, n_boot=n_boot, seed=seed, known=mask)
    metrics["threshold_split"] = "val"
    metrics["threshold_calibrated"] = {n: _num(t) for n, t in zip(label_names, cal_thresholds)}
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

    from cxrflow.results.plots import plot_reliability, plot_roc

    pq.write_table(predictions_table(evaluated, label_names), folder / PREDICTIONS_NAME)
    pq.write_table(predictions_table(validation, label_names), folder / VAL_PREDICTIONS_NAME)
    labels = np.asarray(evaluated["labels"])
    split = metrics.get("split", "test")
    aucs = [metrics["auc"][n] for n in label_names]
    plot_roc(labels, evaluated["probs"], label_names, aucs=aucs, title=f"ROC curves, {what}, {split} split").savefig(
        folder / "roc.png", dpi=110
    )
    ece = metrics["calibration"]["ece_mean"]
    curves = {
        f"raw (mean ECE {ece['before']:.3f})": evaluated["probs"],
        f"temperature-scaled on val (mean ECE {ece['after']:.3f})": evaluated["calprobs"],
    }
    plot_reliability(labels, curves, bins=metrics["calibration"]["bins"], title=f"Reliability, {what}, {split} split").savefig(
        folder / RELIABILITY_NAME, dpi=110
    )
    return ["roc.png", RELIABILITY_NAME]


def evaluation_checkpoint(metrics_path: str | os.PathLike, metrics: dict) -> Path:
    """The checkpoint file an evaluation (or a localization) is about: ``RUN/<checkpoint>.pt`` beside
    a default ``RUN/eval-*`` (``RUN/localize-*``) folder (so a moved run still works), else the
    recorded ``checkpoint_path``."""
    folder = Path(metrics_path).parent
    name = metrics.get("checkpoint")
    if name and folder.name.startswith(("eval-", "localize-")) and (folder.parent / f"{name}.pt").is_file():
        return folder.parent / f"{name}.pt"
    return Path(metrics.get("checkpoint_path") or folder / f"{name}.pt")


def evaluation_status(metrics_path: str | os.PathLike, metrics: dict | None = None) -> str | None:
    """None when the evaluation at ``metrics_path`` belongs to the checkpoint now in its run; else
    one line saying why not and that the run must be evaluated again.

    Compares the evaluation's recorded ``checkpoint_sha256`` with the checkpoint file's bytes now
    (a retrained, resumed or replaced checkpoint has other bytes). An ensemble is current when every
    member's evaluation is and still names the same checkpoint. Every consumer of an evaluation
    calls this before using it.
    """
    metrics_path = Path(metrics_path)
    if metrics is None:
        try:
            metrics = safeio.read_json(metrics_path, "evaluation")
        except (OSError, ValueError, RecursionError) as exc:
            return f"unreadable evaluation ({exc}); run 'cxrflow evaluate' again"
    try:
        check_metrics(metrics, metrics_path)
    except CxrflowError as exc:
        return f"{exc.message}; run 'cxrflow evaluate' (or 'cxrflow ensemble') again"
    if metrics.get("kind") == "ensemble":
        for member in metrics["members"]:
            member_metrics = Path(member.get("eval", "")) / METRICS_NAME
            reason = evaluation_status(member_metrics)
            if reason is None and safeio.read_json(member_metrics, "evaluation").get("checkpoint_sha256") != member.get("checkpoint_sha256"):
                reason = "a member was evaluated again with another checkpoint"
            if reason is not None:
                return f"ensemble member {member.get('run')}: {reason}; build the ensemble again"
        return None
    name = metrics.get("checkpoint", "?")
    run = metrics.get("run", "RUN")
    folder = metrics_path.parent
    # an evaluation written with --out elsewhere is made again in its own folder, not the run's default one
    out = "" if "run" not in metrics or not metrics.get("split") or folder.absolute() == default_eval_dir(Path(str(run)).absolute(), str(metrics["split"]), str(name)) else (
        f" --split {metrics['split']} --out {folder}"
    )
    again = f"run 'cxrflow evaluate --run {run} --checkpoint {name}{out} --overwrite' again"
    return checkpoint_status(metrics_path, metrics, "evaluation", again)


def checkpoint_status(path: str | os.PathLike, record: dict, what: str, again: str) -> str | None:
    """None when the output whose record (``metrics.json``, ``localization.json``) is at ``path`` was
    made from the checkpoint file its run holds now (by ``checkpoint_sha256``); else one line saying
    why not, ending with ``again`` (the command that makes it again). ``what`` names the output."""
    from cxrflow.identity import file_sha256

    recorded = record.get("checkpoint_sha256")
    if not recorded:
        return f"the {what} does not record which checkpoint it scored (made by an older cxrflow); {again}"
    checkpoint = evaluation_checkpoint(path, record)
    if not checkpoint.is_file():
        return f"the {what}'s checkpoint {checkpoint} is gone; {again}"
    if file_sha256(checkpoint) != recorded:
        return (
            f"{checkpoint.name} changed since this {what} (retrained or resumed; it scored "
            f"{record.get('stage')} epoch {record.get('epoch')}); {again}"
        )
    return None


def check_store_identity(config: dict, store: Path, manifest: dict, size: int, splits: Sequence[str]) -> dict[str, str]:
    """The identity of ``splits`` of ``store``; an error when one differs from what the run was
    trained with (another dataset's store, or a store rebuilt from other images or labels)."""
    from cxrflow.identity import store_identity

    now = store_identity(store, manifest, size)
    trained = config.get("store_identity") or {}
    for split in dict.fromkeys(splits):
        if trained.get(split) and now.get(split) != trained[split]:
            raise CxrflowError(
                f"the store's {split} split is not the one this run was trained with (other image ids or "
                "labels); pass the run's own store with --store, or evaluate a run trained on this store",
                store,
            )
    return {split: now[split] for split in dict.fromkeys(splits) if split in now}




def evaluate_run(
    run: str | os.PathLike,
    *,
    checkpoint: str | None = None,
    split: str = "test",
    out: str | os.PathLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 64,
    store: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate one checkpoint of a run on ``split`` and write metrics, predictions and figures.

    Thresholds for sensitivity/specificity come from the validation split. Returns the metrics
    dict with ``out`` (the folder written) added.
    """
    from cxrflow.modelling.inference import resolve_device

    run = Path(run)
    if not run.is_dir():
        raise CxrflowError("no such run folder", run)
    name, ckpt_path = resolve_checkpoint(run, checkpoint)
    out = Path(out) if out is not None else default_eval_dir(run, split, name)
    device = resolve_device(device)
    inputs = [run, ckpt_path] + ([store] if store is not None else [])
    with publishing(out, "evaluate", overwrite=overwrite, inputs=inputs) as pub:
        return _evaluate_into(pub, run, name, ckpt_path, split=split, n_boot=n_boot, seed=seed, device=device,
                              batch_size=batch_size, store=store)


def _evaluate_into(pub, run: Path, name: str, ckpt_path: Path, *, split, n_boot, seed, device, batch_size, store) -> dict:
    """Score the checkpoint, write the evaluation into ``pub.tmp`` and publish it."""
    from cxrflow.modelling.calibration import pos_weight_offsets
    from cxrflow.identity import file_sha256
    from cxrflow.modelling.inference import check_label_names, predict_split, training_pixel_stats
    from cxrflow.modelling.models import load_checkpoint
    from cxrflow.results.plots import plot_training_curves
    from cxrflow.data.store import read_manifest

    checkpoint_sha256 = file_sha256(ckpt_path)
    model, ckpt = load_checkpoint(ckpt_path, map_location=device)
    config = dict(ckpt.get("config") or {})
    store = Path(store) if store is not None else Path(config.get("store", ""))
    if "size" not in config:
        raise CxrflowError("checkpoint config has no 'size'", ckpt_path)
    size = int(config["size"])
    label_names = list(ckpt["label_names"])
    # the normalisation the model was trained with (recorded in its checkpoint), never the store's current one
    pixel_mean, pixel_std = training_pixel_stats(config, size)
    manifest = read_manifest(store)
    identity = check_store_identity(config, store, manifest, size, (split, "val"))
    check_label_names(label_names, manifest, ckpt_path)
    # validation is scored exactly as 'cxrflow predict' scores a file (same inference path and precision)
    score = dict(batch_size=batch_size, device=device, pixel_mean=pixel_mean, pixel_std=pixel_std)
    evaluated = predict_split(model, store, size, split, **score)
    validation = evaluated if split == "val" else predict_split(model, store, size, "val", **score)
    has_states = "uncertain_policies" in manifest  # stores with label states report exclusions
    weights = manifest.get("pos_weight")
    if has_states:  # the loss's pos_weight was that of the run's --uncertain policy, not the manifest's U-Ignore one
        from cxrflow.data.uncertain import policy_pos_weight

        weights = policy_pos_weight(manifest, str(config.get("uncertain") or "ignore")).tolist()
    offsets = pos_weight_offsets(weights, len(label_names))
    metrics = score_with_calibration(
        evaluated, validation, label_names, logit_offsets=offsets, n_boot=n_boot, seed=seed, known=has_states
    )
    loss = evaluated.get("loss")
    metrics = {
        "run": str(run.resolve()),
        "run_name": run.name,
        "checkpoint": name,
        "checkpoint_path": str(Path(ckpt_path).resolve()),
        "checkpoint_sha256": checkpoint_sha256,
        "stage": ckpt.get("stage", CHECKPOINT_STAGE.get(name)),
        "epoch": ckpt.get("epoch"),
        "model": config.get("model"),
        "fusion": config.get("fusion", "none"),
        "size": size,
        "split": split,
        "store": str(store),
        "store_identity": identity,
        "loss": None if loss is None else float(loss),
        # the normalisation the model was trained with, so that 'cxrflow predict' can work without the store
        "pixel_mean": pixel_mean,
        "pixel_std": pixel_std,
        **metrics,
        "cxrflow_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

    tmp = pub.tmp
    figures = write_prediction_files(tmp, evaluated, validation, label_names, metrics, f"{config.get('model')} {size}px, {name}")
    records = read_epoch_records(run)
    if records:
        plot_training_curves(records, title=f"Training curves, {run.name} ({config.get('model')} {size}px)").savefig(
            tmp / "curves.png", dpi=110
        )
        figures.append("curves.png")
    else:
        metrics["figures_note"] = "no metrics.jsonl in the run folder: curves.png not drawn"
    metrics["figures"] = figures
    write_json_atomic(tmp / METRICS_NAME, metrics)
    pub.commit()
    metrics["out"] = str(pub.out)
    return metrics


def format_summary(metrics: dict) -> str:
    """A few lines for the terminal: mean AUC with CI, then one line per finding."""
    ci = metrics.get("mean_auc_ci95")
    ci_text = f" (95% CI {ci[0]:.4f}-{ci[1]:.4f}, patient bootstrap)" if ci else ""
    mean = metrics.get("mean_auc")
    wide = max([20, *map(len, metrics["label_names"])])  # CheXpert's "Enlarged Cardiomediastinum" is 26
    lines = [
        f"{metrics.get('model')} {metrics.get('size')}px {metrics.get('checkpoint')} on {metrics.get('split')}: "
        f"{metrics['n_images']} images, {metrics['n_patients']} patients",
        f"mean AUC {'n/a' if mean is None else f'{mean:.4f}'}{ci_text} over {metrics['n_findings_in_mean']} findings",
        f"{'finding':<{wide}} {'pos':>6} {'AUC':>7}  {'95% CI':<15} {'thresh':>7} {'sens':>6} {'spec':>6}",
    ]

    def f(x: float | None, d: int = 3) -> str:
        return "n/a" if x is None else f"{x:.{d}f}"

    for n in metrics["label_names"]:
        c = metrics["auc_ci95"].get(n)
        lines.append(
            f"{n:<{wide}} {metrics['positives'][n]:>6} {f(metrics['auc'][n]):>7}  "
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
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder written by 'cxrflow train'")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="best_finetune, best_kt, last or a .pt path (default: best_finetune if present, else best_kt)",
    )
    parser.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to evaluate (default: test)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/eval-<split>-<checkpoint>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing evaluation folder")
    parser.add_argument("--n-boot", type=options.n_boot, default=1000, help="patient bootstrap resamples for the CIs (default: 1000)")
    parser.add_argument("--seed", type=options.seed, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--batch-size", type=options.positive_int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--store", default=None, help="store folder, when it moved since training (default: the run's); it must hold the run's splits")
    add_tracking_arguments(parser)  # a tracked run (RUN/mlflow.json) is logged to also without --mlflow


def run(args: argparse.Namespace) -> int:
    tracking = request_from_args(args)
    metrics = evaluate_run(
        args.run,
        checkpoint=args.checkpoint,
        split=args.split,
        out=args.out,
        n_boot=args.n_boot,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
        store=args.store,
        overwrite=args.overwrite,
    )
    log_evaluation(tracking, metrics)
    print(format_summary(metrics))
    print(f"wrote {metrics['out']}/ ({METRICS_NAME}, {PREDICTIONS_NAME}, {VAL_PREDICTIONS_NAME}, {', '.join(metrics['figures'])})")
    return 0
