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
``label_<finding>``), ``roc.png`` and ``curves.png``. ``cxrflow report`` reads those folders.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cxrflow import __version__
from cxrflow.atomic import write_json_atomic
from cxrflow.errors import CxrflowError
from cxrflow.metrics import mean_auc, per_class_auc

#: Checkpoint names a run folder may hold, in the order evaluate prefers them by default.
CHECKPOINT_NAMES = ("best_finetune", "best_kt")
#: Stage each named checkpoint belongs to.
CHECKPOINT_STAGE = {"best_finetune": "finetune", "best_kt": "kt"}
METRICS_NAME = "metrics.json"
PREDICTIONS_NAME = "predictions.parquet"

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
) -> np.ndarray:
    """Per-finding AUC of ``n_boot`` patient-level bootstrap resamples, ``float64[n_boot, K]``.

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
            out[start : start + b, j] = _weighted_auc(y[:, j], probs[:, j], weights)
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
) -> dict[str, Any]:
    """Percentile bootstrap intervals (resampling patients) of each finding's AUC and of the mean.

    Returns ``{"auc_ci": [K] of [lo, hi] or None, "mean_auc_ci": [lo, hi] or None, "n_boot": n}``.
    A finding without an AUC on the full data (one class only) gets None and is left out of the
    mean in every resample, so the mean's interval is over the same findings as the point estimate.
    Resamples in which a finding happens to have one class are dropped for that finding.
    """
    labels = np.asarray(labels)
    point = per_class_auc(labels, probs)
    valid = ~np.isnan(point)
    boots = bootstrap_aucs(labels, probs, patient_ids, n_boot=n_boot, seed=seed)
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
    s = np.asarray(probs, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s_desc = s[order]
    y_desc = y[order]
    # the last index of each run of equal scores: calling ">= that score" positive includes the run
    ends = np.flatnonzero(np.r_[s_desc[1:] != s_desc[:-1], True])
    tpr = np.cumsum(y_desc)[ends] / n_pos
    fpr = np.cumsum(~y_desc)[ends] / n_neg
    best = int(np.argmax(tpr - fpr))  # first maximum = highest threshold
    return float(s_desc[ends[best]])


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
) -> dict[str, Any]:
    """The evaluation of one split as a JSON-ready dict (the core of ``metrics.json``).

    ``thresholds`` ([K], normally from :func:`youden_threshold` on the validation split) give the
    per-finding sensitivity and specificity; without them those entries are omitted.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    names = list(label_names)
    if labels.shape[1] != len(names):
        raise ValueError(f"{labels.shape[1]} label columns but {len(names)} label names")
    aucs = per_class_auc(labels, probs)
    ci = bootstrap_auc_ci(labels, probs, patient_ids, n_boot=n_boot, seed=seed)
    positives = labels.astype(bool).sum(axis=0)
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
        sens_spec = [sensitivity_specificity(labels[:, j], probs[:, j], thresholds[j]) for j in range(len(names))]
        result["threshold"] = {n: _num(t) for n, t in zip(names, thresholds)}
        result["sensitivity"] = {n: _num(ss[0]) for n, ss in zip(names, sens_spec)}
        result["specificity"] = {n: _num(ss[1]) for n, ss in zip(names, sens_spec)}
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


def read_epoch_records(run: str | os.PathLike) -> list[dict]:
    """The epoch records of ``RUN/metrics.jsonl``; a line cut short by a crash is skipped."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
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
    """``predictions.parquet`` content: image_id, patient_id, prob_<finding> ..., label_<finding> ..."""
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
    return pa.table(cols)


def read_predictions(path: str | os.PathLike) -> tuple[dict, list[str]]:
    """Read ``predictions.parquet`` back into (predict_split-style dict, label names)."""
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
    return pred, names


def _publish_dir(tmp: Path, out: Path) -> None:
    """Move a finished temp folder into place, replacing an old ``out`` only once the new one is whole."""
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


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
    from cxrflow.models import load_checkpoint
    from cxrflow.plots import plot_roc, plot_training_curves
    from cxrflow.inference import predict_split, resolve_device

    run = Path(run)
    if not run.is_dir():
        raise CxrflowError("no such run folder", run)
    name, ckpt_path = resolve_checkpoint(run, checkpoint)
    out = Path(out) if out is not None else default_eval_dir(run, split, name)
    if out.exists() and not overwrite:
        raise CxrflowError("evaluation already written; pass --overwrite to replace it", out)
    device = resolve_device(device)
    model, ckpt = load_checkpoint(ckpt_path, map_location=device)
    config = dict(ckpt.get("config") or {})
    store = Path(store) if store is not None else Path(config.get("store", ""))
    if "size" not in config:
        raise CxrflowError("checkpoint config has no 'size'", ckpt_path)
    size = int(config["size"])
    label_names = list(ckpt["label_names"])

    evaluated = predict_split(model, store, size, split, batch_size=batch_size, device=device)
    threshold_split = "val"
    validation = evaluated if split == "val" else predict_split(model, store, size, "val", batch_size=batch_size, device=device)
    val_labels = np.asarray(validation["labels"])
    val_probs = np.asarray(validation["probs"], dtype=np.float64)
    thresholds = np.array([youden_threshold(val_labels[:, j], val_probs[:, j]) for j in range(len(label_names))])

    labels = np.asarray(evaluated["labels"])
    probs = np.asarray(evaluated["probs"], dtype=np.float64)
    metrics = summarize(labels, probs, evaluated["patient_id"], label_names, thresholds, n_boot=n_boot, seed=seed)
    loss = evaluated.get("loss")
    from cxrflow.store import pixel_stats, read_manifest

    pixel_mean, pixel_std = pixel_stats(read_manifest(store), size)
    metrics = {
        "run": str(run.resolve()),
        "run_name": run.name,
        "checkpoint": name,
        "checkpoint_path": str(Path(ckpt_path).resolve()),
        "stage": ckpt.get("stage", CHECKPOINT_STAGE.get(name)),
        "epoch": ckpt.get("epoch"),
        "model": config.get("model"),
        "fusion": config.get("fusion", "none"),
        "size": size,
        "split": split,
        "store": str(store),
        "loss": None if loss is None else float(loss),
        # the normalisation the model was trained with, so that 'cxrflow predict' can work without the store
        "pixel_mean": pixel_mean,
        "pixel_std": pixel_std,
        "threshold_split": threshold_split,
        **metrics,
        "cxrflow_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        import pyarrow.parquet as pq

        pq.write_table(predictions_table(evaluated, label_names), tmp / PREDICTIONS_NAME)
        aucs = [metrics["auc"][n] for n in label_names]
        title = f"ROC curves, {config.get('model')} {size}px, {name}, {split} split"
        plot_roc(labels, probs, label_names, aucs=aucs, title=title).savefig(tmp / "roc.png", dpi=110)
        records = read_epoch_records(run)
        if records:
            plot_training_curves(records, title=f"Training curves, {run.name} ({config.get('model')} {size}px)").savefig(
                tmp / "curves.png", dpi=110
            )
            metrics["figures"] = ["roc.png", "curves.png"]
        else:
            metrics["figures"] = ["roc.png"]
            metrics["figures_note"] = "no metrics.jsonl in the run folder: curves.png not drawn"
        write_json_atomic(tmp / METRICS_NAME, metrics)
        _publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    metrics["out"] = str(out)
    return metrics


def format_summary(metrics: dict) -> str:
    """A few lines for the terminal: mean AUC with CI, then one line per finding."""
    ci = metrics.get("mean_auc_ci95")
    ci_text = f" (95% CI {ci[0]:.4f}-{ci[1]:.4f}, patient bootstrap)" if ci else ""
    mean = metrics.get("mean_auc")
    lines = [
        f"{metrics.get('model')} {metrics.get('size')}px {metrics.get('checkpoint')} on {metrics.get('split')}: "
        f"{metrics['n_images']} images, {metrics['n_patients']} patients",
        f"mean AUC {'n/a' if mean is None else f'{mean:.4f}'}{ci_text} over {metrics['n_findings_in_mean']} findings",
        f"{'finding':<20} {'pos':>6} {'AUC':>7}  {'95% CI':<15} {'thresh':>7} {'sens':>6} {'spec':>6}",
    ]

    def f(x: float | None, d: int = 3) -> str:
        return "n/a" if x is None else f"{x:.{d}f}"

    for n in metrics["label_names"]:
        c = metrics["auc_ci95"].get(n)
        lines.append(
            f"{n:<20} {metrics['positives'][n]:>6} {f(metrics['auc'][n]):>7}  "
            f"{(f'{c[0]:.3f}-{c[1]:.3f}' if c else 'n/a'):<15} {f(metrics.get('threshold', {}).get(n)):>7} "
            f"{f(metrics.get('sensitivity', {}).get(n)):>6} {f(metrics.get('specificity', {}).get(n)):>6}"
        )
    if metrics.get("nan_findings"):
        lines.append(f"no AUC (one class in the split, left out of the mean): {', '.join(metrics['nan_findings'])}")
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
    parser.add_argument("--n-boot", type=int, default=1000, help="patient bootstrap resamples for the CIs (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--store", default=None, help="store folder, when it moved since training (default: the run's)")


def run(args: argparse.Namespace) -> int:
    if args.n_boot < 1:
        raise CxrflowError(f"--n-boot must be at least 1, got {args.n_boot}")
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
    print(format_summary(metrics))
    print(f"wrote {metrics['out']}/ ({METRICS_NAME}, {PREDICTIONS_NAME}, {', '.join(metrics['figures'])})")
    return 0
