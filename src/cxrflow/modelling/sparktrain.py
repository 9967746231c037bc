"""Training on a Spark cluster: ``cxrflow train ... --spark-master URL --processes N [--gpu]``.

Spark's own :class:`pyspark.ml.torch.distributor.TorchDistributor` starts one barrier task per
process (CPU) or per group of GPUs a task owns; each task runs ``torchrun``, and every training
process runs :func:`cxrflow.modelling.train.run_process`, the function a ``torchrun`` launch runs. So the run
folder, checkpoints, metrics, resume and best-checkpoint selection are those of a ``torchrun`` run
with the same number of processes (gloo on CPU, nccl with ``--gpu``); only the start differs.

Before the job, the driver checks (each failure one line, exit 2, nothing written): a
``spark://`` master answers; enough task slots for N processes at once (barrier tasks all start
together or not at all); with ``--gpu``, tasks are given GPUs; a file the driver writes where the
run folder goes is read by the tasks, which also read the same store manifest as the driver; and
cxrflow imports on the executors.

A training process that fails or is killed fails the barrier stage: Spark stops its peers and the
job ends (``spark.task.maxFailures=1``: a blind retry would restart, not resume). The run folder
keeps every finished epoch; ``--resume`` continues from ``last.pt``. Spark's job error carries none
of the processes' output, so each process writes its own failure into a report file beside the run
folder (shared storage), which the driver turns into the one error line.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrflow.errors import CxrflowError
from cxrflow.modelling.config import TrainConfig

#: Spark settings every training session gets (``--spark-conf`` overrides them).
SESSION_CONF = {
    "spark.task.maxFailures": "1",
    # a barrier job that cannot get all its slots fails after ~10 s instead of 10 minutes
    "spark.scheduler.barrier.maxConcurrentTasksCheck.interval": "2s",
    "spark.scheduler.barrier.maxConcurrentTasksCheck.maxFailures": "5",
}


@dataclass(frozen=True)
class SparkLaunch:
    """Where and how to start the training processes on a Spark cluster."""

    master: str
    processes: int = 1
    gpu: bool = False
    conf: dict[str, str] = field(default_factory=dict)
    wait_seconds: float = 60.0

    @property
    def device(self) -> str:
        return "cuda" if self.gpu else "cpu"


# --- checks before the job ---------------------------------------------------------------------------


def session_conf(launch: SparkLaunch) -> dict[str, str]:
    """The Spark settings of a training session: cxrflow's, then the environment's, then ``--spark-conf``."""
    conf = dict(SESSION_CONF)
    if os.environ.get("PYTHONPATH"):  # executors' Python must import this cxrflow too
        conf["spark.executorEnv.PYTHONPATH"] = os.environ["PYTHONPATH"]
    conf.update(launch.conf)
    return conf


def _full_slots(master: str, task_cpus: int) -> int | None:
    """All the slots a ``local-cluster[W,C,M]`` master will ever have (None for other masters)."""
    match = re.fullmatch(r"local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,\s*\d+\s*\]", master)
    return int(match.group(1)) * (int(match.group(2)) // max(task_cpus, 1)) if match else None


def wait_for_slots(spark: Any, launch: SparkLaunch) -> int:
    """Wait (up to ``launch.wait_seconds``) until the cluster has a slot for every process; returns the slots.

    A ``local-cluster`` master's executors register one by one after the session starts: its wait goes
    on until all of them are there, so what a sweep runs at once does not depend on how fast they came.
    """
    jsc = spark.sparkContext._jsc.sc()
    full = _full_slots(launch.master, int(spark.conf.get("spark.task.cpus", "1")))
    target = max(launch.processes, full or 0)
    deadline = time.monotonic() + launch.wait_seconds
    while True:
        profile = jsc.resourceProfileManager().defaultResourceProfile()
        slots = int(jsc.maxNumConcurrentTasks(profile))
        if slots >= target:
            return slots
        if time.monotonic() >= deadline or (full is not None and full <= slots < launch.processes):
            break
        time.sleep(0.5)
    if slots >= launch.processes:
        return slots
    executors = max(int(jsc.getExecutorMemoryStatus().size()) - 1, 0)
    raise CxrflowError(
        f"the Spark master {launch.master} offers {slots} task slot(s) on {executors} executor(s) but "
        f"--processes {launch.processes} needs {launch.processes} at once (barrier tasks): lower --processes, "
        "give the cluster more executors or cores, or wait longer for them (--spark-wait)"
    )


def check_gpu(spark: Any, launch: SparkLaunch) -> None:
    """``--gpu`` needs tasks that are given GPUs (TorchDistributor maps them to CUDA_VISIBLE_DEVICES)."""
    if not launch.gpu:
        return
    amount = spark.conf.get("spark.task.resource.gpu.amount", None)
    try:
        given = float(amount) if amount else 0.0
    except ValueError:
        given = 0.0
    if given < 1:
        raise CxrflowError(
            f"--gpu: the Spark master {launch.master} gives its tasks no GPUs (spark.task.resource.gpu.amount is "
            f"{amount or 'not set'}); on a cluster whose executors have GPUs pass --spark-conf "
            "spark.task.resource.gpu.amount=1, or train on CPU without --gpu"
        )


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_task(probe: str, token: str, manifest: str, digest: str):
    """A self-contained Spark task function: what one executor sees of the driver's files."""

    def check(index, _rows):
        import hashlib
        import os
        import socket

        seen = {"partition": index, "host": socket.gethostname(), "problems": []}
        try:
            with open(probe) as f:
                if f.read() != token:
                    seen["problems"].append("run")
        except OSError:
            seen["problems"].append("run")
        try:
            written = f"{probe}.{index}"
            with open(written, "w") as f:
                f.write(token)
            os.unlink(written)
        except OSError:
            seen["problems"].append("write")
        try:
            with open(manifest, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != digest:
                    seen["problems"].append("store-differs")
        except OSError:
            seen["problems"].append("store")
        try:
            import cxrflow

            seen["cxrflow"] = cxrflow.__file__
        except ImportError:
            seen["problems"].append("cxrflow")
        yield seen

    return check


def check_shared_storage(spark: Any, config: TrainConfig, processes: int) -> None:
    """Tasks on the processes' slots read a file the driver wrote where the run goes, and the store."""
    import hashlib

    from cxrflow.data.store import MANIFEST_NAME

    out, store = Path(config.out), Path(config.store)
    anchor = _nearest_existing(out)
    manifest = store / MANIFEST_NAME
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    token = uuid.uuid4().hex
    probe = anchor / f".cxrflow-probe-{token}"
    try:
        probe.write_text(token)
    except OSError as exc:
        raise CxrflowError(f"cannot write where the run folder goes: {exc.strerror or exc}", anchor) from None
    try:
        rdd = spark.sparkContext.parallelize(range(processes), processes)
        seen = rdd.barrier().mapPartitionsWithIndex(_probe_task(str(probe), token, str(manifest), digest)).collect()
    except Exception as exc:  # Py4J/Spark errors come in many types; all mean the check job failed
        raise CxrflowError(f"the storage check job failed on the Spark cluster: {_first_line(exc)}") from None
    finally:
        probe.unlink(missing_ok=True)
    for s in seen:
        where = f"the task on host {s['host']}"
        if "cxrflow" in s["problems"]:
            raise CxrflowError(
                f"cxrflow cannot be imported by {where}: install it on every node (pip install cxrflow) or make "
                "it visible through PYTHONPATH (spark.executorEnv.PYTHONPATH)"
            )
        if "run" in s["problems"] or "write" in s["problems"]:
            raise CxrflowError(
                f"the run folder is not on storage the Spark executors share: {where} cannot "
                f"{'read a file the driver wrote' if 'run' in s['problems'] else 'write'} in {anchor}; put the run "
                "folder and the store on storage every node mounts (NFS, a cluster file system)",
                out,
            )
        if "store" in s["problems"] or "store-differs" in s["problems"]:
            problem = "finds no" if "store" in s["problems"] else "reads another"
            raise CxrflowError(
                f"the store is not readable from the Spark executors: {where} {problem} {MANIFEST_NAME} there; put "
                "the store on storage every node mounts",
                store,
            )


def check_run_folder(config: TrainConfig, *, resume: bool, overwrite: bool) -> None:
    """The run folder rule of ``cxrflow train``, checked on the driver before any cluster work."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise CxrflowError("the run folder path exists and is not a folder", out)
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise CxrflowError("run folder already exists; pass --resume to continue it or --overwrite to start again", out)


def _first_line(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        line = line.strip()
        if line and not line.startswith(("Traceback", "File ", "at ")):
            return line[:300]
    return type(exc).__name__


def job_error(reports: dict[int, str], out: str | os.PathLike) -> CxrflowError:
    """One clear error for a failed training job from what its processes reported (rank -> "Kind: message").

    A process's own CxrflowError is the answer; otherwise a process failed or was killed (a killed
    process reports nothing; its peers report the broken connection).
    """
    for rank in sorted(reports):
        kind, _, message = reports[rank].partition(": ")
        if kind == "CxrflowError":
            return CxrflowError(message)
    said = "; ".join(f"rank {r}: {reports[r][:200]}" for r in sorted(reports)) or "none reported an error"
    return CxrflowError(
        f"training on the Spark cluster failed: a training process failed or was killed ({said}); the run folder "
        "keeps every finished epoch: run the same command with --resume to continue from last.pt",
        out,
    )


# --- the job ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _output_to(log_path: str | None) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to ``log_path``, if given."""
    if not log_path:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (*saved, fd):
            os.close(f)


def training_process(
    config_values: dict,
    options: dict,
    tracking: Any = None,
    log_path: str | None = None,
    report_path: str | None = None,
) -> dict:
    """What each training process on the cluster runs (TorchDistributor pickles it by reference).

    A failure is also written to ``report_path.<rank>`` (on the shared storage), since the job's
    error on the driver does not carry the processes' output.
    """
    from cxrflow.modelling.config import config_from_dict
    from cxrflow.modelling.train import run_process

    try:
        with _output_to(log_path):
            return run_process(config_from_dict(config_values), tracking=tracking, **options)
    except BaseException as exc:
        if report_path:
            first = (str(exc).strip().splitlines() or [""])[0]
            kind = "CxrflowError" if isinstance(exc, CxrflowError) else type(exc).__name__
            with contextlib.suppress(OSError):
                Path(f"{report_path}.{os.environ.get('RANK', '0')}").write_text(f"{kind}: {first}")
        raise


def _read_reports(report_path: Path) -> dict[int, str]:
    reports = {}
    for path in report_path.parent.glob(glob.escape(report_path.name) + ".*"):
        with contextlib.suppress(OSError, ValueError):
            reports[int(path.suffix[1:])] = path.read_text().strip()
        path.unlink(missing_ok=True)
    return reports


def run_job(
    spark: Any,
    launch: SparkLaunch,
    config: TrainConfig,
    options: dict,
    *,
    tracking: Any = None,
    log_path: str | None = None,
) -> dict:
    """Run the training processes as one barrier job on ``spark``'s cluster; rank 0's summary."""
    from pyspark.ml.torch.distributor import TorchDistributor

    try:
        distributor = TorchDistributor(num_processes=launch.processes, local_mode=False, use_gpu=launch.gpu)
    except RuntimeError as exc:  # its GPU configuration checks
        raise CxrflowError(f"--gpu: {_first_line(exc)}") from None
    distributor.logger.setLevel(logging.WARNING)
    report_path = _nearest_existing(Path(config.out)) / f".cxrflow-report-{uuid.uuid4().hex}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return distributor.run(training_process, config.to_dict(), options, tracking, log_path, str(report_path))
    except Exception:  # Py4J/Spark errors come in many types and carry nothing of the processes' own
        raise job_error(_read_reports(report_path), config.out) from None
    finally:
        _read_reports(report_path)  # removes any left


def prepare(config: TrainConfig, launch: SparkLaunch) -> TrainConfig:
    """The config the cluster's processes get: absolute paths (executors run elsewhere), the launch's device."""
    from cxrflow.data.store import check_partition, read_manifest

    config.store = os.path.abspath(os.path.expanduser(config.store))
    config.out = os.path.abspath(os.path.expanduser(config.out))
    config.device = launch.device
    config.validate()  # several stores: absolute paths, the first is config.store
    if config.multi_store:
        from cxrflow.data.storeset import open_stores

        open_stores(config.all_stores(), config.size)
        return config
    manifest = read_manifest(config.store)
    for split in ("train", "val"):
        check_partition(manifest, config.store, config.size, split)
    return config


@contextlib.contextmanager
def cluster_session(launch: SparkLaunch, app_name: str = "cxrflow-train") -> Iterator[Any]:
    """A Spark session on the launch's master, checked to have the slots (and GPUs) it needs."""
    from cxrflow.data.spark import spark_session

    with spark_session(
        launch.master, app_name, conf=session_conf(launch), executor_wait=launch.wait_seconds
    ) as spark:  # its JVM, executors and workers end with it, however the command ends
        if spark.sparkContext.master != launch.master:  # getOrCreate handed back this process's other session
            raise CxrflowError(
                f"a Spark session on {spark.sparkContext.master} is already running in this process; "
                f"stop it to train on {launch.master}"
            )
        check_gpu(spark, launch)
        wait_for_slots(spark, launch)
        yield spark


def train_on_spark(
    config: TrainConfig,
    launch: SparkLaunch,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    tracking: Any = None,
    spark: Any = None,
    log_path: str | None = None,
) -> dict:
    """``cxrflow train --spark-master``: checks, then the training job; returns rank 0's done.json summary.

    ``spark``: a session already on ``launch.master`` (a sweep's); ``log_path``: where the training
    processes write their output (default: streamed to this terminal by TorchDistributor).
    """
    config = prepare(config, launch)
    check_run_folder(config, resume=resume, overwrite=overwrite)
    options = {"resume": resume, "overwrite": overwrite, "quiet": quiet}
    if spark is None:
        with cluster_session(launch) as session:
            return train_on_spark(config, launch, tracking=tracking, spark=session, **options)
    check_shared_storage(spark, config, launch.processes)
    if log_path is None:
        print(
            f"training on {launch.master}: {launch.processes} process(es), "
            f"{'GPU, nccl' if launch.gpu else 'CPU, gloo'}; run folder {config.out}",
            flush=True,
        )
    return run_job(spark, launch, config, options, tracking=tracking, log_path=log_path)
