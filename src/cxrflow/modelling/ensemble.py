"""Ensembles of evaluated runs: ``cxrflow ensemble RUN_OR_EVAL... --out ENS [--method mean|stacked]``.

Members are evaluation folders written by ``cxrflow evaluate`` (or run folders, standing for their
default checkpoint's evaluation). They are combined from the predictions those folders hold, so an
ensemble needs no new inference:

- ``mean``: the average of the members' calibrated probabilities (each member's own calibration).
- ``stacked``: per finding, a logistic regression (scikit-learn, fixed seed) on the members' logits,
  fitted on the **validation** predictions only, with non-negative weights (a member whose weight
  comes out negative is left out and the regression refitted: a model that ranks images the right
  way round never counts against); a finding with one label value in validation falls back to the
  mean.

The ensemble's output is treated like one model's logits: thresholds are chosen on its validation
predictions, a temperature per finding is fitted on them, and the test split is summarised by the
same patient bootstrap as an evaluation (:func:`cxrflow.modelling.scoring.score_with_calibration`). The
folder ``ENS`` is an evaluation folder in its own right (``metrics.json`` with ``"kind": "ensemble"``,
its method and members, ``predictions.parquet``, ``val_predictions.parquet``, ``roc.png``,
``reliability.png``), so ``cxrflow report`` shows it as a row and ``cxrflow predict --run ENS`` scores
new files with every member (:class:`EnsemblePredictor`).

Members must share label names, split and images (the same store and split); anything else is one
clear error. ``--mlflow [URI]`` logs the ensemble as its own MLflow run, naming its members' MLflow
runs (:func:`cxrflow.tracking.log_ensemble`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cxrflow import __version__, safeio
from cxrflow.atomic import read_json_object, write_json_atomic
from cxrflow.errors import CxrflowError
from cxrflow.identity import file_sha256
from cxrflow.modelling.calibration import apply_temperatures, calibration_of, logit, sigmoid
from cxrflow.modelling.predictor import load_run_predictor, operating_scale
from cxrflow.modelling.scoring import score_with_calibration, write_prediction_files
from cxrflow.outputs import check_target, publishing
from cxrflow.runs import (
    CHECKPOINT_NAMES,
    METRICS_NAME,
    PREDICTIONS_NAME,
    VAL_PREDICTIONS_NAME,
    check_metrics,
    default_eval_dir,
    evaluation_run,
    evaluation_status,
    member_evaluation,
    read_predictions,
    resolve_checkpoint,
)

METHODS = ("mean", "stacked")
#: Inverse regularisation strength of the stacking regression. Mild shrinkage (a tenth of
#: scikit-learn's default) pulls correlated members' weights together, as averaging does; measured
#: in benchmarks/ensemble.py.
STACKING_C = 0.1


# --------------------------------------------------------------------------------------------------
# members


@dataclass
class Member:
    """One evaluated run: where it is, its ``metrics.json`` and its test and validation predictions."""

    eval_dir: Path
    metrics: dict
    test: dict
    val: dict

    @property
    def calibration(self) -> tuple[np.ndarray, np.ndarray]:
        return calibration_of(self.metrics.get("calibration"), self.metrics["label_names"])

    @property
    def name(self) -> str:
        return f"{evaluation_run(self.eval_dir / METRICS_NAME, self.metrics).name}/{self.metrics.get('checkpoint')}"


def evaluation_folder(path: str | os.PathLike, split: str = "test") -> Path:
    """The evaluation folder a member path stands for: itself when it holds ``metrics.json``, else
    (a run folder) the evaluation of its default checkpoint on ``split``."""
    p = Path(path)
    if (p / METRICS_NAME).is_file():
        return p
    if not p.is_dir():
        raise CxrflowError("no such run or evaluation folder", p)
    try:
        name, _ = resolve_checkpoint(p)
    except CxrflowError:
        raise CxrflowError("neither an evaluation folder (no metrics.json) nor a trained run", p) from None
    folder = default_eval_dir(p, split, name)
    if not (folder / METRICS_NAME).is_file():
        raise CxrflowError(f"not evaluated on {split!r} at {name}: run 'cxrflow evaluate --run {p}' first", p)
    return folder


def load_member(path: str | os.PathLike, split: str = "test") -> Member:
    """Read one member's evaluation; an ensemble, or an evaluation without calibration or validation
    predictions (written before they existed), is an error."""
    folder = evaluation_folder(path, split)
    metrics = read_json_object(folder / METRICS_NAME, "evaluation")
    check_metrics(metrics, folder / METRICS_NAME)
    if metrics.get("kind") == "ensemble":
        raise CxrflowError("an ensemble cannot be a member of another ensemble; name its runs instead", folder)
    if "label_names" not in metrics or "calibration" not in metrics or not (folder / VAL_PREDICTIONS_NAME).is_file():
        raise CxrflowError(
            "evaluated without calibration or validation predictions (an older cxrflow); "
            f"re-run 'cxrflow evaluate --run {evaluation_run(folder / METRICS_NAME, metrics)} --overwrite'",
            folder,
        )
    stale = evaluation_status(folder / METRICS_NAME, metrics)
    if stale is not None:  # the member's numbers must belong to the checkpoint its run holds now
        raise CxrflowError(stale, folder)
    test, test_names = read_predictions(folder / PREDICTIONS_NAME, metrics, rows=metrics.get("n_images"))
    val, val_names = read_predictions(folder / VAL_PREDICTIONS_NAME, metrics)
    if (
        test_names != metrics["label_names"]
        or val_names != metrics["label_names"]
        or "logits" not in test
        or "logits" not in val
    ):
        raise CxrflowError("predictions do not match metrics.json (missing logit columns or other findings)", folder)
    return Member(folder, metrics, test, val)


def _aligned(pred: dict, order: list[str], what: str, member: Member, first: Member) -> dict:
    """``pred`` reordered to the image order ``order``; other images are an error."""
    ids = pred["image_id"]
    if len(ids) != len(order) or set(ids) != set(order):
        raise CxrflowError(
            f"scored other {what} images than {first.eval_dir} ({len(ids)} vs {len(order)}; another store or split?)",
            member.eval_dir,
        )
    index = {i: n for n, i in enumerate(ids)}
    take = np.array([index[i] for i in order])
    return {k: (list(order) if k == "image_id" else np.asarray(v)[take]) for k, v in pred.items()}


def check_members(members: Sequence[Member]) -> list[Member]:
    """Members aligned to the first one's image order, after checking they can be combined."""
    if len(members) < 2:
        raise CxrflowError(f"an ensemble needs at least two evaluated runs, got {len(members)}")
    first = members[0]
    seen: dict[str, Path] = {}
    aligned = []
    for m in members:
        key = m.metrics.get("checkpoint_sha256") or m.metrics.get("checkpoint_path") or str(m.eval_dir.resolve())
        if key in seen:
            raise CxrflowError(f"the same checkpoint is named twice (also via {seen[key]})", m.eval_dir)
        seen[key] = m.eval_dir
        if m.metrics["label_names"] != first.metrics["label_names"]:
            theirs, ours = m.metrics["label_names"], first.metrics["label_names"]
            diff = sorted(set(theirs) ^ set(ours)) or ["same names, other order"]
            raise CxrflowError(
                f"other label names than {first.eval_dir} ({len(theirs)} vs {len(ours)} findings; differ: {', '.join(diff[:4])})",
                m.eval_dir,
            )
        if m.metrics.get("split") != first.metrics.get("split"):
            raise CxrflowError(
                f"evaluated on split {m.metrics.get('split')!r}, {first.eval_dir} on {first.metrics.get('split')!r}",
                m.eval_dir,
            )
        a, b = m.metrics.get("store_identity"), first.metrics.get("store_identity")
        if a is not None and b is not None and any(a[s] != b[s] for s in set(a) & set(b)):  # splits both record
            raise CxrflowError(f"evaluated on another store than {first.eval_dir}", m.eval_dir)
        test = _aligned(m.test, first.test["image_id"], "test", m, first)
        val = _aligned(m.val, first.val["image_id"], "validation", m, first)
        for what, mine, ref in (("test", test, first.test), ("validation", val, first.val)):
            if not np.array_equal(mine["labels"], ref["labels"]):
                raise CxrflowError(
                    f"other {what} labels than {first.eval_dir} for the same images (another store?)", m.eval_dir
                )
        aligned.append(Member(m.eval_dir, m.metrics, test, val))
    return aligned


# --------------------------------------------------------------------------------------------------
# combining


def ensemble_logits(
    method: str, member_logits: Sequence[np.ndarray], member_calibrations: Sequence[tuple], stacking: list | None = None
) -> np.ndarray:
    """The ensemble's logits ``float64[N, K]`` from each member's raw logits ``[N, K]``.

    ``mean``: logit of the mean calibrated probability. ``stacked``: per finding
    ``intercept + sum_m coef_m * logit_m`` from ``stacking`` (one ``{"coef", "intercept"}`` or None
    = the mean, per finding). Used both on stored predictions and by ``cxrflow predict``.
    """
    z = np.stack([np.asarray(m, dtype=np.float64) for m in member_logits])  # [M, N, K]
    mean = logit(np.mean([apply_temperatures(z[i], *c) for i, c in enumerate(member_calibrations)], axis=0))
    if method == "mean":
        return mean
    if method != "stacked" or stacking is None:
        raise ValueError(
            f"method {method!r} needs stacking weights" if method == "stacked" else f"unknown method {method!r}"
        )
    out = mean.copy()
    for j, weights in enumerate(stacking):
        if weights is not None:
            out[:, j] = weights["intercept"] + np.tensordot(np.asarray(weights["coef"]), z[:, :, j], axes=1)
    return out


def _nonnegative_logistic(x: np.ndarray, y: np.ndarray, seed: int) -> dict:
    """Logistic regression of ``y`` on the columns of ``x`` with weights >= 0: while a weight is
    negative, the column with the most negative one is left out (weight 0) and the rest refitted."""
    from sklearn.linear_model import LogisticRegression

    active = list(range(x.shape[1]))
    while True:
        model = LogisticRegression(C=STACKING_C, random_state=seed, max_iter=1000).fit(x[:, active], y)
        coef = model.coef_[0]
        if (coef >= 0).all() or len(active) == 1:
            break
        active.pop(int(np.argmin(coef)))
    weights = np.zeros(x.shape[1])
    weights[active] = coef
    return {"coef": [float(c) for c in weights], "intercept": float(model.intercept_[0])}


def fit_stacking(
    member_logits: Sequence[np.ndarray], labels: np.ndarray, *, seed: int = 0, known: np.ndarray | None = None
) -> list[dict | None]:
    """Per finding, a logistic regression with non-negative weights of the label on the members'
    validation logits, over the rows whose label is known (``known`` ``[N, K]``, all without it);
    None for a finding with one label value (it then uses the mean)."""
    z = np.stack([np.asarray(m, dtype=np.float64) for m in member_logits])  # [M, N, K]
    labels = np.asarray(labels)
    mask = np.ones(labels.shape, bool) if known is None else np.asarray(known).astype(bool)
    fits: list[dict | None] = []
    for j in range(labels.shape[1]):
        y = labels[mask[:, j], j].round().astype(int)
        fits.append(
            None if len(y) == 0 or y.min() == y.max() else _nonnegative_logistic(z[:, mask[:, j], j].T, y, seed)
        )
    return fits


def _combined(member_preds: Sequence[dict], logits: np.ndarray) -> dict:
    first = member_preds[0]
    return {
        "image_id": list(first["image_id"]),
        "patient_id": np.asarray(first["patient_id"], dtype=np.int64),
        "labels": np.asarray(first["labels"], dtype=np.float32),
        "logits": logits.astype(np.float32),
        "probs": sigmoid(logits).astype(np.float32),
        **({"known": np.asarray(first["known"])} if first.get("known") is not None else {}),  # label states
    }


def _ensemble_metrics(paths, out: Path, method: str, split: str, n_boot: int, seed: int) -> tuple:
    """The members combined and scored: (metrics, test and validation predictions, names, members)."""
    from cxrflow.data.demographics import rescored_baseline

    members = check_members([load_member(p, split) for p in paths])
    names = list(members[0].metrics["label_names"])
    calibrations = [m.calibration for m in members]
    known = members[0].val.get("known")  # stores with label states: fits and metrics on known labels only
    stacking = (fit_stacking([m.val["logits"] for m in members], members[0].val["labels"], seed=seed, known=known)
                if method == "stacked" else None)  # fmt: skip
    validation = _combined(
        [m.val for m in members], ensemble_logits(method, [m.val["logits"] for m in members], calibrations, stacking)
    )
    evaluated = _combined(
        [m.test for m in members], ensemble_logits(method, [m.test["logits"] for m in members], calibrations, stacking)
    )
    has_states = known is not None or members[0].test.get("known") is not None
    scored = score_with_calibration(evaluated, validation, names, n_boot=n_boot, seed=seed, known=has_states)
    first = members[0].metrics
    metrics: dict[str, Any] = {
        "kind": "ensemble",
        "method": method,
        "members": [
            {
                "run": str(evaluation_run(m.eval_dir / METRICS_NAME, m.metrics)),  # as it is now (copied, moved)
                "eval": str(m.eval_dir.resolve()),
                "checkpoint": m.metrics.get("checkpoint"),
                "checkpoint_sha256": m.metrics["checkpoint_sha256"],
                "model": m.metrics.get("model"),
                "size": m.metrics.get("size"),
                "stage": m.metrics.get("stage"),
                "mean_auc": m.metrics.get("mean_auc"),
                "ece_mean_calibrated": (m.metrics.get("calibration") or {}).get("ece_mean", {}).get("after"),
            }
            for m in members
        ],
        "member_names": [m.name for m in members],
        "run": str(out.resolve()),
        "run_name": out.name,
        "checkpoint": None,
        "stage": "ensemble",
        "model": f"ensemble({method})",
        "size": sorted({m.metrics.get("size") for m in members}, key=str),
        "split": first.get("split", split),
        "store": first.get("store"),
        **({"store_identity": first["store_identity"]} if "store_identity" in first else {}),
        **scored,
        "demographics_only": rescored_baseline(first.get("demographics_only"), names, scored["auc"], str(members[0].eval_dir)),
        "stacking": None if stacking is None else {
            "fitted_on": "val", "model": f"logistic regression on the members' logits, weights >= 0 (C={STACKING_C}, seed {seed})",
            "weights": dict(zip(names, stacking)), "fallback_to_mean": [n for n, w in zip(names, stacking) if w is None]},
        "cxrflow_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    return metrics, evaluated, validation, names, members


def build_ensemble(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    method: str = "mean",
    split: str = "test",
    n_boot: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
    audit: Callable[[Path, dict, dict, list[str], dict], str] | None = None,
) -> dict[str, Any]:
    """Combine evaluated runs into the ensemble folder ``out``; returns its metrics (with ``out``).

    ``audit`` (the subgroup audit, :func:`cxrflow.results.subgroups.ensemble_audit`) is called with the
    folder being written, the test and validation predictions, the finding names and the metrics
    before the predictions are written; it adds to them and returns words for the figure titles."""
    if method not in METHODS:
        raise CxrflowError(f"unknown ensemble method {method!r}; use mean or stacked")
    out = Path(out)
    check_target(out, "ensemble", overwrite=overwrite, inputs=paths)
    if len(paths) < 2:
        raise CxrflowError(f"an ensemble needs at least two evaluated runs, got {len(paths)}")
    # the lock is held from the start, so a second ensemble on the same --out (even with --overwrite)
    # stops naming this one instead of replacing its output a moment later
    with publishing(out, "ensemble", overwrite=overwrite, inputs=paths) as pub:
        metrics, evaluated, validation, names, members = _ensemble_metrics(paths, out, method, split, n_boot, seed)
        what = f"{metrics['model']} of {len(members)} runs"
        if audit is not None:
            what += audit(pub.tmp, evaluated, validation, names, metrics)
        metrics["figures"] = write_prediction_files(pub.tmp, evaluated, validation, names, metrics, what)
        write_json_atomic(pub.tmp / METRICS_NAME, metrics)
        pub.commit()
    return {**metrics, "out": str(out)}


# --------------------------------------------------------------------------------------------------
# prediction on new files


@dataclass
class EnsemblePredictor:
    """Every member's model, combined as the ensemble was: the face of :class:`cxrflow.modelling.predictor.Predictor`."""

    members: list  # of cxrflow.modelling.predictor.Predictor, raw logits
    member_calibrations: list[tuple]
    method: str
    stacking: list | None
    label_names: list[str]
    checkpoint: Path
    thresholds: dict[str, float] | None
    calibration: tuple | None

    @property
    def sizes(self) -> list[int]:
        return sorted({s for m in self.members for s in m.sizes})

    @property
    def size(self) -> list[int]:
        return self.sizes

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    @property
    def uses_demographics(self) -> bool:
        return any(m.uses_demographics for m in self.members)

    def logits(self, images: dict, demographics=None) -> np.ndarray:
        member_logits = [m.logits(images, demographics if m.uses_demographics else None) for m in self.members]
        return ensemble_logits(self.method, member_logits, self.member_calibrations, self.stacking)

    def probabilities(self, images: dict, demographics=None) -> np.ndarray:
        z = self.logits(images, demographics)
        return sigmoid(z) if self.calibration is None else apply_temperatures(z, *self.calibration)


def load_ensemble_predictor(folder: str | os.PathLike, *, device: str = "cpu", raw: bool = False) -> EnsemblePredictor:
    """Load every member of the ensemble folder for ``cxrflow predict``; a member checkpoint that
    changed since the ensemble was built is an error."""
    folder = Path(folder)
    metrics = read_json_object(folder / METRICS_NAME, "ensemble")
    check_metrics(metrics, folder / METRICS_NAME)
    if metrics.get("kind") != "ensemble":
        raise CxrflowError(
            "an evaluation folder, not a run or ensemble: give --run the run folder it belongs to", folder
        )
    stale = evaluation_status(folder / METRICS_NAME, metrics)  # every member's checkpoint, by its recorded hash
    if stale is not None:
        raise CxrflowError(stale, folder)
    names = list(metrics["label_names"])
    members, member_calibrations = [], []
    for entry in metrics["members"]:
        checkpoint = entry.get("checkpoint") if entry.get("checkpoint") in (*CHECKPOINT_NAMES, "last") else None
        member = member_evaluation(folder / METRICS_NAME, metrics, entry) / METRICS_NAME  # moved along, too
        try:
            evaluation = safeio.read_json(member, "evaluation")
        except (OSError, ValueError, RecursionError):
            raise CxrflowError("a member's evaluation is gone; rebuild the ensemble", entry["eval"]) from None
        check_metrics(evaluation, member)  # its calibration is used below
        predictor = load_run_predictor(
            evaluation_run(member, evaluation), checkpoint or evaluation["checkpoint_path"], device=device, raw=True
        )
        if file_sha256(predictor.checkpoint) != entry["checkpoint_sha256"]:  # replaced in the meantime
            raise CxrflowError(
                "a member's checkpoint changed since the ensemble was built; rebuild the ensemble", predictor.checkpoint
            )
        if predictor.label_names != names:
            raise CxrflowError("a member's label names differ from the ensemble's", predictor.checkpoint)
        members.append(predictor)
        member_calibrations.append(calibration_of(evaluation["calibration"], names))
    stacking = metrics.get("stacking")
    weights = None if stacking is None else [stacking["weights"].get(n) for n in names]
    thresholds, calibration = operating_scale(metrics, names, raw=raw)
    return EnsemblePredictor(
        members, member_calibrations, metrics["method"], weights, names, folder, thresholds, calibration
    )


# --------------------------------------------------------------------------------------------------
# command line
