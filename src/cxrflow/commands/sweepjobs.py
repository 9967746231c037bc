"""A sweep's runs on a Spark cluster (``cxrflow sweep --spark-master URL``): each run's training is its
own distributed job on one shared session; its evaluations run here as subprocesses.

Used by :func:`cxrflow.sweep.run_sweep` (which re-exports :func:`run_sweep_jobs`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cxrflow.errors import CxrflowError
from cxrflow.modelling.sparktrain import SparkLaunch


def run_sweep_jobs(
    jobs: list, launch: SparkLaunch, echo: Callable[[str], None], command: Callable[[list[str]], list[str]]
) -> None:
    """A sweep on the cluster: every job's ``train`` step is its own barrier job on one shared session,
    as many at once as the cluster's slots allow; its ``evaluate`` steps run here as subprocesses.

    ``jobs`` are :class:`cxrflow.sweep._Job` (name, steps, log, failed); a failed step fails its job only.
    """
    from concurrent.futures import ThreadPoolExecutor

    from cxrflow.modelling.sparktrain import cluster_session, wait_for_slots

    with cluster_session(launch, "cxrflow-sweep") as spark:
        at_once = max(1, wait_for_slots(spark, launch) // launch.processes)
        echo(f"on {launch.master}: {launch.processes} process(es) per run, {at_once} run(s) at once")
        with ThreadPoolExecutor(max_workers=at_once) as pool:
            list(pool.map(lambda job: _run_steps(spark, launch, job, echo, command), jobs))


def _run_steps(
    spark: Any, launch: SparkLaunch, job: Any, echo: Callable[[str], None], command: Callable[[list[str]], list[str]]
) -> None:
    import subprocess

    from cxrflow.commands.train import get_args_parser, run_config
    from cxrflow.modelling.sparktrain import train_on_spark
    from cxrflow.tracking import request_from_args

    while job.steps:
        argv = job.steps.popleft()
        with open(job.log, "a") as log:
            log.write(f"\n$ cxrflow {' '.join(argv)}\n")
        echo(f"[{job.name}] cxrflow {argv[0]}{' on the cluster' if argv[0] == 'train' else ''}; log: {job.log}")
        try:
            if argv[0] == "train":
                args = get_args_parser().parse_args(argv[1:])
                train_on_spark(
                    run_config(args),
                    launch,
                    resume=args.resume,
                    overwrite=args.overwrite,
                    quiet=True,
                    tracking=request_from_args(args),
                    spark=spark,
                    log_path=str(job.log),
                )
            else:
                with open(job.log, "a") as log:
                    code = subprocess.run(command(argv), stdout=log, stderr=subprocess.STDOUT).returncode
                if code != 0:
                    job.failed = f"exit status {code}; see {job.log}"
        except CxrflowError as exc:
            with open(job.log, "a") as log:
                log.write(f"error: {exc}\n")
            job.failed = str(exc)
        if job.failed:
            echo(f"[{job.name}] failed ({job.failed})")
            return
    echo(f"[{job.name}] done")
