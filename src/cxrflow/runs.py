"""A run folder and what is written into it: where things are, which checkpoint an output scored,
and whether that output still belongs to the checkpoint the run holds now.

A run folder (``cxrflow train --out RUN``) holds ``best_kt.pt``, ``best_finetune.pt`` and
``last.pt``, ``metrics.jsonl`` (one record per epoch), and the outputs made from its checkpoints:
evaluations in ``RUN/eval-<split>-<checkpoint>/`` (``metrics.json``, ``predictions.parquet``,
``val_predictions.parquet``, figures) and localizations in ``RUN/localize-<split>-<checkpoint>/``.

- :func:`resolve_checkpoint`: ``best_finetune`` / ``best_kt`` / ``last`` / a path to (name, file).
- :class:`Provenance`: the record every output keeps of the checkpoint it scored (with its hash).
- :func:`evaluation_status` / :func:`checkpoint_status`: the one check every consumer of an
  evaluation or localization makes before using it (the checkpoint's bytes must be unchanged);
  :func:`ensemble_status` does it for an ensemble, member by member.
- :func:`check_metrics`, :func:`read_epoch_records`, :func:`predictions_table`,
  :func:`read_predictions`: the files' shapes, read and written in one place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from shlex import quote
from typing import Any

import numpy as np

from cxrflow import safeio
from cxrflow.errors import CxrflowError
from cxrflow.identity import file_sha256

#: Checkpoint names a run folder may hold, in the order evaluate prefers them by default.
CHECKPOINT_NAMES = ("best_finetune", "best_kt")
#: Stage each named checkpoint belongs to.
CHECKPOINT_STAGE = {"best_finetune": "finetune", "best_kt": "kt"}
METRICS_NAME = "metrics.json"
PREDICTIONS_NAME = "predictions.parquet"
#: The validation split's predictions, same columns (ensembles are fitted on them without inference).
VAL_PREDICTIONS_NAME = "val_predictions.parquet"
RELIABILITY_NAME = "reliability.png"


# --------------------------------------------------------------------------------------------------
# where things are


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
        raise CxrflowError(f"no such checkpoint (give {', '.join(CHECKPOINT_NAMES)}, last, or a .pt file)", path)
    return path.stem, path


def default_eval_dir(run: str | os.PathLike, split: str, checkpoint_name: str, store_name: str | None = None) -> Path:
    """Where ``cxrflow evaluate`` writes by default: ``RUN/eval-<split>-<checkpoint>``, or
    ``RUN/eval-<store_name>-<split>-<checkpoint>`` for an evaluation on another collection's store."""
    return Path(run) / (
        f"eval-{store_name}-{split}-{checkpoint_name}" if store_name else f"eval-{split}-{checkpoint_name}"
    )


def default_localize_dir(run: str | os.PathLike, split: str, checkpoint_name: str) -> Path:
    """Where ``cxrflow localize`` writes by default: ``RUN/localize-<split>-<checkpoint>``."""
    return Path(run) / f"localize-{split}-{checkpoint_name}"


# --------------------------------------------------------------------------------------------------
# which checkpoint an output scored


@dataclasses.dataclass(frozen=True)
class Provenance:
    """The checkpoint an output (an evaluation's ``metrics.json``, a ``localization.json``) was made
    from: its run, name, file and content hash, and the stage, epoch and model it holds. Written at
    the top of the output's record; :func:`checkpoint_status` checks it later."""

    run: str
    run_name: str
    checkpoint: str
    checkpoint_path: str
    checkpoint_sha256: str
    stage: str | None
    epoch: int | None
    model: str | None

    @classmethod
    def of(cls, run: str | os.PathLike, name: str, path: str | os.PathLike, ckpt: dict, sha256: str) -> Provenance:
        """The provenance of checkpoint ``name`` (file ``path``, loaded as ``ckpt``, bytes hashing to
        ``sha256``) of the run folder ``run``."""
        run = Path(run)
        return cls(
            run=str(run.resolve()),
            run_name=run.name,
            checkpoint=name,
            checkpoint_path=str(Path(path).resolve()),
            checkpoint_sha256=sha256,
            stage=ckpt.get("stage", CHECKPOINT_STAGE.get(name)),
            epoch=ckpt.get("epoch"),
            model=(ckpt.get("config") or {}).get("model"),
        )

    def record(self) -> dict[str, Any]:
        """The fields as the JSON object an output's record starts with."""
        return dataclasses.asdict(self)


def recorded_paths(**paths: str | os.PathLike) -> dict[str, str]:
    """``paths`` as a run or an output records them: absolute and normalised (links kept), so that the
    record means the same from any working folder; a moved store is then looked for relative to the
    run's own recorded place (:func:`cxrflow.data.store.locate_store`)."""
    return {key: os.path.abspath(path) for key, path in paths.items()}


def is_run_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a run folder (it holds the ``config.json`` ``cxrflow train`` writes)."""
    return (Path(folder) / "config.json").is_file()


def evaluation_run(metrics_path: str | os.PathLike, metrics: dict) -> Path:
    """The run folder an evaluation (or a localization) belongs to, wherever the two are now.

    The folder it is in, when that is a run folder (so ``mv run elsewhere`` and ``cp -r run run2``
    keep each evaluation with its own run: run2's evaluations are run2's), else the run recorded
    when it was made (an evaluation written with ``--out`` elsewhere), else the folder it is in.
    """
    folder = Path(os.path.abspath(metrics_path)).parent
    if is_run_folder(folder.parent) or not metrics.get("run"):
        return folder.parent
    named = Path(str(metrics["run"]))
    return named if named.is_dir() else folder.parent


def member_evaluation(metrics_path: str | os.PathLike, metrics: dict, member: dict) -> Path:
    """An ensemble member's evaluation folder as it is now: the recorded one, else the same place
    relative to the ensemble's folder (the ensemble and its members' runs moved together)."""
    recorded = Path(str(member.get("eval", "")))
    if (recorded / METRICS_NAME).is_file() or not metrics.get("run") or not recorded.is_absolute():
        return recorded
    folder = Path(os.path.abspath(metrics_path)).parent
    moved = Path(os.path.normpath(folder / os.path.relpath(recorded, str(metrics["run"]))))
    return moved if (moved / METRICS_NAME).is_file() else recorded


def evaluation_checkpoint(metrics_path: str | os.PathLike, metrics: dict) -> Path:
    """The checkpoint file an evaluation (or a localization) is about: ``RUN/<checkpoint>.pt`` of
    its run (:func:`evaluation_run`, so a moved or copied run still works), else the recorded
    ``checkpoint_path``."""
    folder = Path(metrics_path).parent
    name = metrics.get("checkpoint")
    run = evaluation_run(metrics_path, metrics)
    if name and (run / f"{name}.pt").is_file():
        return run / f"{name}.pt"
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
        return ensemble_status(metrics_path, metrics)
    name = metrics.get("checkpoint", "?")
    run = evaluation_run(metrics_path, metrics)  # the run as it is now, so the command works as printed
    folder = Path(os.path.abspath(metrics_path)).parent
    # an evaluation written with --out elsewhere is made again in its own folder, not the run's default one
    out = (
        ""
        if not metrics.get("split") or folder == default_eval_dir(run, str(metrics["split"]), str(name))
        else (f" --split {metrics['split']} --out {quote(str(folder))}")
    )
    if metrics.get("alignment") is not None and not metrics.get("trained_on_store"):  # another collection's store
        maps = "".join(f" --map {quote(str(m))}" for m in metrics.get("map") or [])
        out = f" --store {quote(str(metrics.get('store')))} --split {metrics.get('split')}{maps}" + (
            "" if folder.name.startswith("eval-") else f" --out {quote(str(folder))}")  # fmt: skip
    again = f"run 'cxrflow evaluate --run {quote(str(run))} --checkpoint {name}{out} --overwrite' again"
    return checkpoint_status(metrics_path, metrics, "evaluation", again)


def ensemble_status(metrics_path: str | os.PathLike, metrics: dict) -> str | None:
    """None when every member of the ensemble at ``metrics_path`` still holds the checkpoint the
    ensemble was built from (its ``checkpoint_sha256``, recorded per member) and that checkpoint's
    evaluation is current; else one line naming the member and the commands that make it whole again.
    Every use of an ensemble (report, predict, export) calls this, through :func:`evaluation_status`."""
    members = metrics["members"]
    evals = [member_evaluation(metrics_path, metrics, m) for m in members]  # as they are now (moved together)
    rebuild = shlex.join(
        ["cxrflow", "ensemble", *(str(e) for e in evals), "--out", str(Path(metrics_path).parent)]
        + ["--method", str(metrics.get("method", "mean")), "--overwrite"]
    )
    for member, member_eval in zip(members, evals):
        who = f"ensemble member {member.get('run')} ({member.get('checkpoint')})"
        recorded = member.get("checkpoint_sha256")
        if not (isinstance(recorded, str) and len(recorded) == 64):
            return f"{who}: the ensemble does not record which checkpoint it was built from; rebuild it: {rebuild}"
        member_path = member_eval / METRICS_NAME
        try:
            evaluation = safeio.read_json(member_path, "evaluation")
        except (OSError, ValueError, RecursionError) as exc:
            return (
                f"{who}: its evaluation {member_path} is unreadable ({exc}); evaluate it again and rebuild: {rebuild}"
            )
        checkpoint = evaluation_checkpoint(member_path, evaluation)
        evaluate = shlex.join(
            [
                "cxrflow",
                "evaluate",
                "--run",
                str(evaluation_run(member_path, evaluation)),
                "--checkpoint",
                str(member.get("checkpoint") or checkpoint),
            ]
            + ["--overwrite"]
        )
        if not checkpoint.is_file():
            return f"{who}: its checkpoint {checkpoint} is gone; the ensemble cannot be used without it"
        if file_sha256(checkpoint) != recorded:
            return (
                f"{who}: {checkpoint.name} changed since the ensemble was built (replaced, retrained or resumed); "
                f"evaluate it again ({evaluate}), then rebuild the ensemble: {rebuild}"
            )
        reason = evaluation_status(member_path, evaluation)
        if reason is None and evaluation.get("checkpoint_sha256") != recorded:
            reason = "its evaluation scored another checkpoint than the ensemble was built from"
        if reason is not None:
            return f"{who}: {reason}; then rebuild the ensemble: {rebuild}"
    return None


def checkpoint_status(path: str | os.PathLike, record: dict, what: str, again: str) -> str | None:
    """None when the output whose record (``metrics.json``, ``localization.json``) is at ``path`` was
    made from the checkpoint file its run holds now (by ``checkpoint_sha256``); else one line saying
    why not, ending with ``again`` (the command that makes it again). ``what`` names the output."""
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


# --------------------------------------------------------------------------------------------------
# the files of an evaluation


def _number(x: Any) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and bool(np.isfinite(x)))


def _fraction(x: Any) -> bool:
    """A number in 0..1 (an AUC, a sensitivity, a prevalence) or null."""
    return _number(x) and (x is None or 0 <= x <= 1)


def _interval(x: Any) -> bool:
    """``[low, high]`` with 0 <= low <= high <= 1, or null."""
    return x is None or (
        isinstance(x, list) and len(x) == 2 and all(_fraction(v) and v is not None for v in x) and x[0] <= x[1]
    )


#: Fields of ``metrics.json`` that map findings to a number, and what each number must be.
_PER_FINDING = (
    ("auc", _fraction, "AUCs in 0..1 or null"),
    ("auprc", _fraction, "numbers in 0..1 or null"),
    ("sensitivity", _fraction, "numbers in 0..1 or null"),
    ("specificity", _fraction, "numbers in 0..1 or null"),
    ("prevalence", _fraction, "numbers in 0..1 or null"),
    ("threshold", _number, "numbers or null"),
    ("threshold_calibrated", _number, "numbers or null"),
    ("auc_ci95", _interval, "intervals [low, high] in 0..1 with low <= high, or null"),
    ("auprc_ci95", _interval, "intervals [low, high] in 0..1 with low <= high, or null"),
    ("sensitivity_ci95", _interval, "intervals [low, high] in 0..1 with low <= high, or null"),
    ("specificity_ci95", _interval, "intervals [low, high] in 0..1 with low <= high, or null"),
)


def check_metrics(m: Any, path: str | os.PathLike) -> dict:
    """``m`` (a parsed ``metrics.json``) if it has the shape readers rely on and its numbers are
    possible (finite, in range, intervals not reversed, the mean the mean of its AUCs), else one
    CxrflowError naming the file and the field. Every reader of an evaluation checks it here."""
    if not isinstance(m, dict):
        raise CxrflowError(f"not a cxrflow evaluation: expected a JSON object, got {type(m).__name__}", path)
    for key in ("mean_auc", "auc", "label_names"):
        if key not in m:
            raise CxrflowError(f"not a cxrflow evaluation: key {key!r} is missing", path)
    names = m["label_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CxrflowError("metrics field 'label_names' must be a list of finding names", path)
    if len(set(names)) != len(names):
        raise CxrflowError(f"metrics field 'label_names' names a finding twice: {names!r}"[:240], path)
    if not _fraction(m["mean_auc"]):
        raise CxrflowError(f"metrics field 'mean_auc' must be a number in 0..1 or null, got {m['mean_auc']!r}", path)
    for key, valid, expected in _PER_FINDING:
        value = m.get(key, {})
        if value is None and key not in ("auc", "threshold"):
            continue
        if not isinstance(value, dict) or not all(valid(v) for v in value.values()):
            raise CxrflowError(f"metrics field {key!r} must map findings to {expected}", path)
        unknown = [k for k in value if k not in names]
        if unknown:
            raise CxrflowError(f"metrics field {key!r} names {unknown[0]!r:.60}, not one of 'label_names'", path)
    if not _interval(m.get("mean_auc_ci95")):
        raise CxrflowError(
            f"metrics field 'mean_auc_ci95' must be [low, high] in 0..1 with low <= high, or null, got {m.get('mean_auc_ci95')!r}"[
                :240
            ],
            path,
        )
    _check_mean(m, path)
    _check_counts(m, path)
    _check_calibration(m.get("calibration"), names, path)
    return m


def _check_calibration(calibration: Any, names: list, path: str | os.PathLike) -> None:
    """Temperatures positive and offsets finite (a NaN temperature makes every probability NaN)."""
    if calibration is None:
        return
    if not isinstance(calibration, dict):
        raise CxrflowError("metrics field 'calibration' must be an object", path)
    for key, valid, expected in (
        ("temperature", lambda t: _number(t) and (t is None or t > 0), "positive numbers or null"),
        ("logit_offset", _number, "numbers or null"),
    ):
        value = calibration.get(key) or {}
        if not isinstance(value, dict) or not all(valid(v) for v in value.values()):
            raise CxrflowError(f"metrics field 'calibration.{key}' must map findings to {expected}", path)


def _check_mean(m: dict, path: str | os.PathLike) -> None:
    """``mean_auc`` must be the mean of the AUCs it says it averages (``n_findings_in_mean`` of them)."""
    aucs = [v for v in m["auc"].values() if v is not None]
    if m.get("n_findings_in_mean") == len(aucs) and aucs and m["mean_auc"] is not None:
        if abs(float(np.mean(aucs)) - m["mean_auc"]) > 1e-6:
            raise CxrflowError(
                f"metrics field 'mean_auc' is {m['mean_auc']!r} but the mean of its {len(aucs)} AUCs is "
                f"{float(np.mean(aucs)):.4f}: the file was changed",
                path,
            )


def _check_counts(m: dict, path: str | os.PathLike) -> None:
    """Ensemble members, sizes and image counts of the shape readers rely on."""
    members = m.get("members")
    if m.get("kind") == "ensemble" and not (
        isinstance(members, list)
        and all(
            isinstance(x, dict) and isinstance(x.get("run"), str) and isinstance(x.get("eval"), str) for x in members
        )
    ):
        raise CxrflowError(
            f"metrics field 'members' of an ensemble must be a list of objects with 'run' and 'eval' folders, got {members!r}"[
                :240
            ],
            path,
        )
    size = m.get("size")
    sizes = size if m.get("kind") == "ensemble" and isinstance(size, list) else [size]  # an ensemble's members' sizes
    if size is not None and not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise CxrflowError(f"metrics field 'size' must be a positive integer, got {size!r}", path)
    for key in ("n_images", "n_patients"):
        n = m.get(key)
        if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
            raise CxrflowError(f"metrics field {key!r} must be a non-negative integer, got {n!r}"[:200], path)
    if not _number(m.get("loss")):
        raise CxrflowError(f"metrics field 'loss' must be a finite number or null, got {m.get('loss')!r}", path)


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
    for column, kind in (("age", pa.int16()), ("sex", pa.string()), ("view", pa.string())):  # the audit's attributes
        if pred.get(column) is not None:
            cols[column] = pa.array(list(pred[column]), kind)
    known = pred.get("known")
    if known is not None and not np.asarray(known).all():
        for j, name in enumerate(label_names):
            cols[f"known_{name}"] = pa.array(np.asarray(known)[:, j].round().astype(np.uint8))
    return pa.table(cols)


def read_predictions(
    path: str | os.PathLike, metrics: dict | None = None, *, rows: int | None = None
) -> tuple[dict, list[str]]:
    """Read ``predictions.parquet`` (or ``val_predictions.parquet``) back into (predict_split-style
    dict, label names); ``logits``, ``calprobs`` and ``known`` are there when the file has those columns.

    The one reader of an evaluation's predictions: a file that is not Parquet, of another schema,
    with probabilities outside 0..1, labels other than 0/1 or NaN / infinite logits, other findings
    than ``metrics`` (its evaluation's ``metrics.json``) names, or other than ``rows`` rows, is one
    CxrflowError naming the file and the problem.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(safeio.regular_file(path, "predictions file"))
    except CxrflowError:
        raise
    except Exception as exc:  # a truncated or foreign file: pyarrow's errors have many types
        raise CxrflowError(f"not a readable predictions file ({_first(exc)})", path) from None
    names = [c[len("prob_") :] for c in table.column_names if c.startswith("prob_")]
    _check_prediction_columns(table, names, path)
    if metrics is not None and names != list(metrics.get("label_names") or []):
        raise CxrflowError(
            f"the predictions' findings ({len(names)}: {', '.join(names)[:80]}) are not those of its metrics.json "
            f"({len(metrics.get('label_names') or [])}); evaluate again",
            path,
        )
    if rows is not None and table.num_rows != rows:
        raise CxrflowError(f"{table.num_rows} rows, but its metrics.json counts {rows} images; evaluate again", path)
    frame = table.to_pandas()
    pred = {
        "image_id": frame["image_id"].astype(str).tolist(),
        "patient_id": frame["patient_id"].to_numpy(np.int64),
        "probs": frame[[f"prob_{n}" for n in names]].to_numpy(np.float64),
        "labels": frame[[f"label_{n}" for n in names]].to_numpy(np.float64),
    }
    for key, prefix in (("logits", "logit_"), ("calprobs", "calprob_")):
        if all(f"{prefix}{n}" in frame for n in names):
            pred[key] = frame[[f"{prefix}{n}" for n in names]].to_numpy(np.float64)
    if names and f"known_{names[0]}" in frame.columns:
        pred["known"] = frame[[f"known_{n}" for n in names]].to_numpy(np.float64)
    _check_prediction_values(pred, path)
    return pred, names


def _first(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def _check_prediction_columns(table: Any, names: list[str], path: Path) -> None:
    """The columns :func:`predictions_table` writes, of its types (from the schema alone)."""
    import pyarrow as pa

    schema = table.schema
    types = {
        "image_id": (pa.types.is_string, pa.types.is_large_string),
        "patient_id": (pa.types.is_integer,),
        **{f"prob_{n}": (pa.types.is_floating,) for n in names},
        **{f"label_{n}": (pa.types.is_integer, pa.types.is_floating) for n in names},
    }
    for prefix in ("logit_", "calprob_", "known_"):
        if any(f"{prefix}{n}" in schema.names for n in names):
            kinds = (pa.types.is_integer, pa.types.is_floating) if prefix == "known_" else (pa.types.is_floating,)
            types.update({f"{prefix}{n}": kinds for n in names})
    if not names:
        raise CxrflowError("not a cxrflow predictions file: no prob_<finding> columns", path)
    for column, kinds in types.items():
        if column not in schema.names:
            raise CxrflowError(f"not a cxrflow predictions file: column {column!r:.80} is missing", path)
        if not any(kind(schema.field(column).type) for kind in kinds):
            raise CxrflowError(
                f"column {column!r:.80} is {schema.field(column).type}, not the type cxrflow writes", path
            )


def _check_prediction_values(pred: dict, path: Path) -> None:
    """Probabilities in 0..1, labels and known flags 0/1, logits finite: else the file is damaged."""
    checks = (
        ("probs", "probabilities", lambda a: np.isfinite(a) & (a >= 0) & (a <= 1)),
        ("calprobs", "calibrated probabilities", lambda a: np.isfinite(a) & (a >= 0) & (a <= 1)),
        ("logits", "logits", np.isfinite),
        ("labels", "labels", lambda a: (a == 0) | (a == 1)),
        ("known", "known flags", lambda a: (a == 0) | (a == 1)),
    )
    for key, what, ok in checks:
        values = pred.get(key)
        if values is not None and not ok(values).all():
            row, col = np.argwhere(~ok(values))[0]
            raise CxrflowError(
                f"{what} must be {'0 or 1' if key in ('labels', 'known') else 'finite' if key == 'logits' else 'in 0..1'}, "
                f"got {values[row, col]!r} (row {row + 1}, finding {col + 1}): the file is damaged; evaluate again",
                path,
            )
