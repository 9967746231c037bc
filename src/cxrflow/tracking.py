"""Experiment tracking in MLflow: ``--mlflow [URI]`` on train, evaluate, sweep and ensemble.

The run folder stays the source of truth; MLflow gets a copy of it:

- training: the resolved config (``RUN/config.json``) as params, nested keys joined with ``.``;
  every epoch's metrics (``train_loss``, ``val_loss``, ``val_auc_mean``, ``val_auc/<finding>``,
  ``lr``, ``images_per_second``) with step = the epoch's line number in ``metrics.jsonl`` (1, 2, ...
  across both stages; the ``stage_index`` metric says which stage a step belongs to); at the end
  ``config.json``, ``metrics.jsonl`` and ``done.json`` as artifacts;
- evaluation: ``<split>/<checkpoint>/mean_auc`` with ``.../mean_auc_ci95_low``/``_high`` and
  ``.../auc/<finding>``, and the evaluation's ``metrics.json`` and figures as artifacts under
  ``eval-<split>-<checkpoint>/``;
- an ensemble: its own MLflow run (named after its folder), with ``method``, ``split``,
  ``label_names`` and per member ``members.<i>.name``/``.eval``/``.checkpoint_sha256`` (and, for a
  tracked member, ``.mlflow_run_id``/``.mlflow_tracking_uri``) as params; ``<split>/ensemble/mean_auc``
  with its CI and per-finding AUCs as an evaluation's; its ``metrics.json`` and figures as artifacts.
  A rebuilt ensemble (``--overwrite``) is a new MLflow run, in the store of the one it replaced.

``RUN/mlflow.json`` (an ensemble's: ``ENS/mlflow.json``) records the tracking URI and the MLflow run
id, so a resumed training and later evaluations log into the same MLflow run, with or without
``--mlflow``. Without a URI the tracking store is a local folder: ``mlruns`` beside the run (or
ensemble) folder (a sweep's: ``OUT/mlruns``), which
``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri PATH`` opens.

MLflow is optional (``pip install 'cxrflow[mlflow]'``, which installs mlflow-skinny). A tracking
backend that fails (server down or refusing, disk full) costs one warning; this process then logs
nothing more and training or evaluation carries on. A later resume or evaluation of the run logs
the epochs MLflow is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cxrflow import safeio
from cxrflow.atomic import write_json_atomic
from cxrflow.errors import CxrflowError
from cxrflow.outputs import note_written

RUN_ID_FILE = "mlflow.json"
DEFAULT_EXPERIMENT = "cxrflow"
DEFAULT_STORE = "mlruns"
#: URI schemes MLflow's tracking client understands (database schemes may carry "+driver").
SCHEMES = ("file", "http", "https", "databricks", "databricks-uc", "sqlite", "postgresql", "mysql", "mssql")
#: Epoch-row fields logged as metrics (the rest are identifiers or nested).
EPOCH_METRICS = ("train_loss", "val_loss", "val_auc_mean", "lr", "seconds", "images_per_second")
_PARAM_LIMIT = 6000


@dataclass(frozen=True)
class TrackingRequest:
    """What the command line asked for: ``uri`` None = only runs already tracked; "" = the default store."""

    uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--mlflow [URI]`` and ``--mlflow-experiment NAME``."""
    parser.add_argument(
        "--mlflow",
        nargs="?",
        const="",
        default=None,
        metavar="URI",
        help="log to MLflow: a tracking URI (http://host:port, file:///path, databricks) or, without one, "
        "a local store 'mlruns' beside the run folder (needs pip install 'cxrflow[mlflow]')",
    )
    parser.add_argument(
        "--mlflow-experiment",
        default=DEFAULT_EXPERIMENT,
        metavar="NAME",
        help=f"MLflow experiment of new runs (default {DEFAULT_EXPERIMENT!r})",
    )


def check_uri(uri: str) -> str:
    """A tracking URI in the form MLflow's client takes (folders become file URIs), or one clear error."""
    text = uri.strip()
    bad = CxrflowError(
        f"malformed MLflow tracking URI {uri!r}: expected a folder, file:///path, http(s)://host[:port], "
        "databricks or a database URI such as sqlite:///path/mlflow.db"
    )
    if not text or any(c.isspace() for c in text):
        raise bad
    if text in ("databricks", "databricks-uc"):
        return text
    parsed = urlparse(text)
    if not parsed.scheme or (len(parsed.scheme) == 1 and os.name == "nt"):
        if ":" in text:
            raise bad
        return Path(os.path.abspath(os.path.expanduser(text))).as_uri()
    if parsed.scheme.split("+")[0] not in SCHEMES:
        raise bad
    try:
        parsed.port  # noqa: B018 - raises ValueError on a non-numeric or out-of-range port
    except ValueError:
        raise bad from None
    if parsed.scheme in ("http", "https") and not parsed.hostname:
        raise bad
    if parsed.scheme == "file" and (not parsed.path or parsed.netloc not in ("", "localhost")):
        raise bad
    return text


def require_mlflow() -> None:
    """One clear error when the optional MLflow package is missing."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise CxrflowError("--mlflow needs MLflow, which is not installed: pip install 'cxrflow[mlflow]'") from None


def request_from_args(args: argparse.Namespace) -> TrackingRequest:
    """The tracking the options ask for, checked (URI form, package) before any work starts."""
    uri = getattr(args, "mlflow", None)
    if uri is not None:
        uri = check_uri(uri) if uri else ""
        require_mlflow()
    return TrackingRequest(uri, getattr(args, "mlflow_experiment", DEFAULT_EXPERIMENT) or DEFAULT_EXPERIMENT)


def request_from_argv(argv: Sequence[str]) -> TrackingRequest:
    """The tracking that the ``--mlflow``/``--mlflow-experiment`` options in ``argv`` ask for (as a
    sweep passes them on to its steps)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return request_from_args(parser.parse_known_args(list(argv))[0])


def read_record(run_folder: str | os.PathLike) -> dict | None:
    """``RUN/mlflow.json`` (tracking URI, experiment and run id), or None when the run is not tracked."""
    path = Path(run_folder) / RUN_ID_FILE
    try:
        record = safeio.read_json(path, "tracking record", safeio.CONFIG_BYTES)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError):
        return None  # a damaged record: the run is tracked again from scratch
    return record if isinstance(record, dict) and record.get("run_id") else None


def default_uri(folder: str | os.PathLike) -> str:
    """The local tracking store of runs written under ``folder``."""
    return Path(os.path.abspath(folder), DEFAULT_STORE).as_uri()


def flatten_params(values: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: keys joined with '.', lists as JSON, values capped in length."""
    params: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            params.update(flatten_params(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            params[name] = text[:_PARAM_LIMIT]
    return params


def epoch_metrics(row: dict) -> dict[str, float]:
    """One metrics.jsonl row as MLflow metrics (undefined values left out)."""
    values = {k: row.get(k) for k in EPOCH_METRICS}
    values.update({f"val_auc/{name}": v for name, v in (row.get("val_auc") or {}).items()})
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def evaluation_metrics(metrics: dict) -> dict[str, float]:
    """An evaluation's (or ensemble's) metrics.json as MLflow metrics: mean AUC with its CI and
    per-finding AUCs, under ``<split>/<checkpoint>/`` (an ensemble's checkpoint: ``ensemble``)."""
    prefix = f"{metrics['split']}/{metrics.get('checkpoint') or metrics.get('stage')}"
    values = {f"{prefix}/mean_auc": metrics.get("mean_auc")}
    ci = metrics.get("mean_auc_ci95")
    if ci:
        values[f"{prefix}/mean_auc_ci95_low"], values[f"{prefix}/mean_auc_ci95_high"] = ci
    values.update({f"{prefix}/auc/{name}": v for name, v in (metrics.get("auc") or {}).items()})
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def ensemble_params(metrics: dict) -> dict[str, str]:
    """An ensemble's metrics.json as MLflow params: method, split, label names and its members, with
    the MLflow run id of each member whose run is tracked."""
    members = {}
    for i, (member, name) in enumerate(zip(metrics["members"], metrics["member_names"])):
        record = read_record(member["run"]) if member.get("run") else None
        members[str(i)] = {
            "name": name, "eval": member["eval"], "checkpoint_sha256": member.get("checkpoint_sha256"),
            **({"mlflow_run_id": record["run_id"], "mlflow_tracking_uri": record.get("tracking_uri")} if record else {}),
        }  # fmt: skip
    return flatten_params(
        {
            "method": metrics["method"],
            "split": metrics.get("split"),
            "label_names": list(metrics["label_names"]),
            "members": members,
        }
    )


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Tracker:
    """One run folder's MLflow run. Every call is guarded: the first backend failure is one warning,
    and the tracker logs nothing more in this process."""

    def __init__(
        self,
        uri: str,
        run_folder: str | os.PathLike,
        *,
        experiment: str = DEFAULT_EXPERIMENT,
        run_id: str | None = None,
        warn: Callable[[str], None] = _warn,
    ):
        self.uri, self.folder, self.experiment = uri, Path(run_folder), experiment
        self.run_id, self.warn = run_id, warn
        self.client: Any = None
        self.failed = False
        self.created = False
        self.logged_step: int | None = None

    @classmethod
    def for_run(
        cls, request: TrackingRequest | None, run_folder: str | os.PathLike, warn: Callable[[str], None] = _warn
    ) -> Tracker | None:
        """The tracker of a run folder: its recorded MLflow run, or a new one where ``request`` asks."""
        request = request or TrackingRequest()
        record = read_record(run_folder)
        if request.uri is None and record is None:
            return None
        uri = request.uri or (
            record["tracking_uri"] if record else default_uri(Path(os.path.abspath(run_folder)).parent)
        )
        same = record is not None and record.get("tracking_uri") == uri
        return cls(uri, run_folder, experiment=request.experiment, run_id=record["run_id"] if same else None, warn=warn)

    # -- guarded access ----------------------------------------------------------------------------

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.failed:
            return None
        try:
            return fn()
        except Exception as exc:  # any backend failure (connection, HTTP, disk) must not stop the work
            self.failed = True
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            self.warn(
                f"warning: MLflow tracking at {self.uri} failed while {what} ({first}); carrying on without it; "
                f"the run folder {self.folder} keeps everything, and a later --resume or evaluate logs what is missing"
            )
            return None

    def _open(self) -> None:
        if self.client is not None:
            return
        from mlflow.tracking import MlflowClient

        if self.uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow-skinny has no database backend
        os.environ.setdefault(
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"
        )  # a server that is down costs seconds, not minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        client = MlflowClient(tracking_uri=self.uri)
        if self.run_id is not None:
            try:
                client.get_run(self.run_id)
            except Exception as exc:
                if (
                    "RESOURCE_DOES_NOT_EXIST" not in str(getattr(exc, "error_code", ""))
                    and "not found" not in str(exc).lower()
                ):
                    raise
                self.run_id = None  # the recorded run was deleted: track the folder in a new one
        if self.run_id is None:
            experiment = client.get_experiment_by_name(self.experiment)
            if experiment is None:
                try:
                    experiment_id = client.create_experiment(self.experiment)
                except Exception:  # created meanwhile by a concurrent run of the sweep
                    experiment_id = client.get_experiment_by_name(self.experiment).experiment_id
            else:
                experiment_id = experiment.experiment_id
            run = client.create_run(
                experiment_id, run_name=self.folder.name, tags={"cxrflow.run_folder": str(self.folder.resolve())}
            )
            self.run_id = run.info.run_id
            self.created = True
            note_written(self.folder, RUN_ID_FILE)  # an --overwrite may replace it with the folder
            write_json_atomic(
                self.folder / RUN_ID_FILE,
                {
                    "tracking_uri": self.uri,
                    "experiment": self.experiment,
                    "experiment_id": experiment_id,
                    "run_id": self.run_id,
                },
            )
        self.client = client

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    # -- training ----------------------------------------------------------------------------------

    def _log_missing(self, history: list[dict], *, training: bool) -> None:
        """Log the epochs MLflow does not have yet (step = line number in metrics.jsonl)."""
        self._open()
        if self.logged_step is None:
            if self.created:
                config_path = self.folder / "config.json"
                self._log_params(
                    flatten_params(safeio.read_json(config_path, "run config", safeio.CONFIG_BYTES))
                    if config_path.is_file()
                    else {}
                )
                self.logged_step = 0
            else:
                if training:
                    self.client.update_run(self.run_id, status="RUNNING")
                done = self.client.get_metric_history(self.run_id, "train_loss")
                self.logged_step = max((m.step for m in done), default=0)
        stage_names: list[str] = []
        for step, row in enumerate(history, start=1):
            if row["stage"] not in stage_names:
                stage_names.append(row["stage"])
            if step > self.logged_step:
                extra = {"stage_index": float(len(stage_names) - 1), "epoch": float(row["epoch"])}
                self._log_metrics({**epoch_metrics(row), **extra}, step)
                self.logged_step = step

    def _log_params(self, values: dict[str, str]) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in values.items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def _log_files(self, folder: Path, names: list[str], artifact_path: str | None = None) -> None:
        for name in names:
            if (folder / name).is_file():
                self.client.log_artifact(self.run_id, str(folder / name), artifact_path=artifact_path)

    def log_epochs(self, history: list[dict]) -> None:
        """The training epoch hook: log the epochs of ``history`` MLflow does not have yet."""
        self._guard("logging an epoch", lambda: self._log_missing(history, training=True))

    def finish(self, status: str = "FINISHED") -> None:
        """Attach the run folder's files and mark the MLflow run finished (or failed/killed)."""
        from cxrflow.runs import read_epoch_records

        def close() -> None:
            self._log_missing(read_epoch_records(self.folder), training=True)
            self._log_files(self.folder, ["config.json", "metrics.jsonl", "done.json"])
            self.client.set_terminated(self.run_id, status=status)

        if self.client is not None or status == "FINISHED":
            self._guard("closing the run", close)

    # -- evaluation --------------------------------------------------------------------------------

    def log_evaluation(self, metrics: dict, eval_folder: str | os.PathLike) -> None:
        """An evaluation's mean AUC with CI, per-finding AUCs, metrics.json and figures (and any
        training epochs MLflow missed)."""
        from cxrflow.runs import read_epoch_records

        def log() -> None:
            self._log_missing(read_epoch_records(self.folder), training=False)
            self._log_metrics(evaluation_metrics(metrics), int(metrics.get("epoch") or 0))
            folder = Path(eval_folder)
            self._log_files(folder, ["metrics.json", *metrics.get("figures", [])], artifact_path=folder.name)

        self._guard("logging an evaluation", log)

    def log_ensemble(self, metrics: dict) -> None:
        """The ensemble folder as a finished MLflow run: its params, AUCs, metrics.json and figures."""

        def log() -> None:
            self._open()
            if self.created:
                self._log_params(ensemble_params(metrics))
            self._log_metrics(evaluation_metrics(metrics), 0)
            self._log_files(self.folder, ["metrics.json", *metrics.get("figures", [])])
            self.client.set_terminated(self.run_id, status="FINISHED")

        self._guard("logging an ensemble", log)


@contextlib.contextmanager
def tracked_training(
    request: TrackingRequest | None, run_folder: str | os.PathLike, enabled: bool = True
) -> Iterator[Callable[[list[dict]], None] | None]:
    """The epoch hook of one training process (None when untracked or not rank 0); closes the MLflow run."""
    tracker = Tracker.for_run(request, run_folder) if enabled else None
    if tracker is None:
        yield None
        return
    try:
        yield tracker.log_epochs
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    if (Path(run_folder) / "done.json").is_file():
        tracker.finish("FINISHED")


def log_evaluation(request: TrackingRequest | None, metrics: dict) -> None:
    """Log an evaluation into its run folder's MLflow run (when tracked or asked for)."""
    tracker = Tracker.for_run(request, metrics["run"])
    if tracker is not None:
        tracker.log_evaluation(metrics, metrics["out"])


def log_ensemble(request: TrackingRequest | None, metrics: dict, replaced: dict | None = None) -> None:
    """Log a newly built ensemble folder as its own MLflow run when asked for, or when the ensemble
    it replaced was tracked (``replaced``: that folder's record, read before it was replaced)."""
    if (request is None or request.uri is None) and replaced is not None:
        request = TrackingRequest(replaced["tracking_uri"], replaced.get("experiment") or DEFAULT_EXPERIMENT)
    tracker = Tracker.for_run(request, metrics["out"])
    if tracker is not None:
        tracker.log_ensemble(metrics)
