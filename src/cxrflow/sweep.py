"""Train, evaluate and report every run listed in a config file; re-runnable after a crash.

A sweep file (YAML, TOML or JSON) names a store, settings shared by every run, and the runs::

    store: data/nih-store          # relative to the working directory; --store overrides it
                                   # (a run may name several instead: stores: [data/nih, data/chexpert])
    defaults:                      # any 'cxrflow train' setting (see cxrflow.modelling.config.TrainConfig)
      preset: paper
      pretrained: imagenet
    runs:
      - name: densenet121-256      # the run folder's name: OUT/runs/<name>/
        model: densenet121
        size: 256
        evaluate: [best_kt, best_finetune]   # optional; the default is every stage the run trains

A two-stage run is trained once and evaluated at both stages' best checkpoints, which gives the
paper's "KT" and "fine-tuned" rows from one run. A sweep may also list ensembles of its runs::

    ensembles:
      - name: densenet-resnet-512  # OUT/ensembles/<name>/
        members: [densenet121-512, resnet50-512:best_kt]   # run, or run:checkpoint (default: its last stage)
        method: stacked            # mean (default) or stacked; see cxrflow.modelling.ensemble

For every run the sweep

1. trains it unless ``OUT/runs/<name>/done.json`` exists (a folder left by a crash is resumed from
   its ``last.pt``; a run whose saved settings differ from the file is an error, never mixed);
2. evaluates each listed checkpoint on the test split unless ``OUT/runs/<name>/eval-test-<ckpt>/``
   exists (evaluations are written atomically, so a present folder is complete);
3. builds each ensemble unless ``OUT/ensembles/<name>/metrics.json`` exists (once its members are
   evaluated; in this process, from their stored predictions);
4. and finally writes the report (``OUT/report/table.md``, ``table.csv``, ``comparison.png``).

Each step is a ``cxrflow`` command run in a subprocess (so a crash or a killed sweep leaves only
finished files behind), logged to ``OUT/logs/<name>.log``. With several GPUs the runs go in
parallel, one per GPU (``CUDA_VISIBLE_DEVICES``); on CPU one at a time. A failed run does not stop
the others: it is named at the end and the exit status is 2.

``--spark-master URL --processes N``: each run's training is its own distributed job on the Spark
cluster (:func:`run_sweep_jobs`, in :mod:`cxrflow.commands.sweepjobs`), as many at once as the cluster's slots allow.
``--mlflow [URI]`` tracks every run and ensemble (default store ``OUT/mlruns``; see :mod:`cxrflow.tracking`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrflow import options, safeio
from cxrflow.atomic import write_json_atomic
from cxrflow.commands.sweepjobs import run_sweep_jobs
from cxrflow.errors import CxrflowError
from cxrflow.modelling.config import TrainConfig, apply_overrides, preset, read_config_file
from cxrflow.modelling.sparktrain import SparkLaunch
from cxrflow.outputs import claiming
from cxrflow.runs import METRICS_NAME, default_eval_dir, evaluation_status
from cxrflow.tracking import log_ensemble, request_from_argv

RUN_KEYS = ("name", "evaluate")
#: Settings that may differ between the sweep file and an existing run (they do not change results).
_FREE_SETTINGS = ("out", "device", "num_workers")
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class RunSpec:
    """One run of a sweep: its name, resolved training config and the checkpoints to evaluate."""

    name: str
    config: TrainConfig
    evaluate: list[str]


@dataclass
class EnsembleSpec:
    """One ensemble of a sweep: its name, method and members as (run name, checkpoint)."""

    name: str
    method: str
    members: list[tuple[str, str]]


@dataclass
class Sweep:
    """A parsed sweep file."""

    runs: list[RunSpec]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)
    ensembles: list[EnsembleSpec] = field(default_factory=list)


def _default_checkpoints(config: TrainConfig) -> list[str]:
    return [f"best_{s.name}" for s in config.stages()]


def parse_sweep(data: dict, *, source: str = "sweep config", store: str | os.PathLike | None = None) -> Sweep:
    """Resolve and validate a sweep given as a mapping (the content of a sweep file)."""
    if not isinstance(data, dict):
        raise CxrflowError("a sweep config must be a mapping with 'runs'", source)
    unknown = set(data) - {"store", "defaults", "runs", "n_boot", "description", "ensembles"}
    if unknown:
        raise CxrflowError(
            f"unknown top-level keys {sorted(unknown)}; expected store, defaults, runs, n_boot, ensembles", source
        )
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        raise CxrflowError("'runs' must be a non-empty list of runs", source)
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise CxrflowError("'defaults' must be a mapping of training settings", source)
    store_path = store if store is not None else data.get("store")
    store_path = str(Path(store_path).expanduser().resolve()) if store_path else ""
    specs: list[RunSpec] = []
    for i, entry in enumerate(runs, start=1):
        where = f"{source} (run {i})"
        if not isinstance(entry, dict):
            raise CxrflowError(f"run {i} must be a mapping of settings", source)
        name = str(entry.get("name", ""))
        if not _NAME_OK.match(name):
            raise CxrflowError(f"run {i} needs a 'name' made of letters, digits, '.', '_' or '-', got {name!r}", source)
        if any(s.name == name for s in specs):
            raise CxrflowError(f"two runs are named {name!r}", source)
        settings = {**defaults, **{k: v for k, v in entry.items() if k not in RUN_KEYS}}
        config = preset(str(settings.pop("preset", "default")))
        apply_overrides(config, settings, where)
        if not config.stores:  # a run may name several stores ('stores: [A, B]') instead of the sweep's
            config.store = store_path
        if not config.store and not config.stores:
            raise CxrflowError("no store: set 'store' in the sweep file or pass --store", source)
        config.out = name
        try:
            config.validate()
        except CxrflowError as exc:
            raise CxrflowError(exc.message, exc.path or where, exc.line) from None
        checkpoints = entry.get("evaluate") or _default_checkpoints(config)
        if isinstance(checkpoints, str):
            checkpoints = [checkpoints]
        possible = _default_checkpoints(config)
        if not isinstance(checkpoints, list):
            raise CxrflowError(
                f"run {name!r}: 'evaluate' must be a list of checkpoints ({', '.join(possible)}), got {checkpoints!r}",
                source,
            )
        bad = [c for c in checkpoints if c not in possible]
        if bad:
            raise CxrflowError(f"run {name!r} cannot evaluate {bad}: it trains {', '.join(possible)}", source)
        specs.append(RunSpec(name, config, list(checkpoints)))
    n_boot = data.get("n_boot", 1000)
    try:
        options.check_n_boot(n_boot)
    except ValueError as exc:
        raise CxrflowError(str(exc), source) from None
    return Sweep(specs, source, {"n_boot": n_boot}, parse_ensembles(data.get("ensembles") or [], specs, source))


def parse_ensembles(entries: Any, runs: Sequence[RunSpec], source: str) -> list[EnsembleSpec]:
    """Validate the ``ensembles`` list of a sweep file against its runs."""
    from cxrflow.modelling.ensemble import METHODS

    if not isinstance(entries, list):
        raise CxrflowError("'ensembles' must be a list of {name, members, method}", source)
    by_name = {r.name: r for r in runs}
    specs: list[EnsembleSpec] = []
    for i, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or set(entry) - {"name", "members", "method"}:
            raise CxrflowError(f"ensemble {i} must be a mapping with name, members and method only", source)
        name = str(entry.get("name", ""))
        if not _NAME_OK.match(name) or name in {s.name for s in specs} or name in by_name:
            raise CxrflowError(
                f"ensemble {i} needs a 'name' made of letters, digits, '.', '_' or '-', unique among runs and ensembles, got {name!r}",
                source,
            )
        method = str(entry.get("method", "mean"))
        if method not in METHODS:
            raise CxrflowError(f"ensemble {name!r}: unknown method {method!r}; use mean or stacked", source)
        members = entry.get("members")
        if not isinstance(members, list) or len(members) < 2:
            raise CxrflowError(f"ensemble {name!r} needs at least two members (run names)", source)
        resolved = []
        for member in map(str, members):
            run_name, _, checkpoint = member.partition(":")
            if run_name not in by_name:
                raise CxrflowError(f"ensemble {name!r}: no run named {run_name!r} in this sweep", source)
            checkpoint = checkpoint or _default_checkpoints(by_name[run_name].config)[-1]
            if checkpoint not in by_name[run_name].evaluate:
                raise CxrflowError(f"ensemble {name!r}: run {run_name!r} is not evaluated at {checkpoint}", source)
            resolved.append((run_name, checkpoint))
        if len(set(resolved)) != len(resolved):
            raise CxrflowError(f"ensemble {name!r} names a member twice", source)
        specs.append(EnsembleSpec(name, method, resolved))
    return specs


def build_sweep_ensembles(
    sweep: Sweep, out: Path, *, n_boot: int, echo: Callable[[str], None], tracking: Sequence[str] = ()
) -> tuple[list[Path], dict[str, str]]:
    """Build every ensemble whose members are evaluated and that is not built yet; returns the
    ensemble folders that exist and the failures (name: reason). ``tracking``: the steps' options
    (``--mlflow URI``), under which each new ensemble becomes its own MLflow run."""
    from cxrflow.modelling.ensemble import build_ensemble
    from cxrflow.results.subgroups import ensemble_audit

    built: list[Path] = []
    failed: dict[str, str] = {}
    for spec in sweep.ensembles:
        folder = out / "ensembles" / spec.name
        if (folder / METRICS_NAME).is_file():
            built.append(folder)
            continue
        evals = [default_eval_dir(run_dir(out, r), "test", c) for r, c in spec.members]
        missing = [str(e) for e in evals if not (e / METRICS_NAME).is_file()]
        if missing:
            failed[spec.name] = f"members not evaluated: {', '.join(missing)}"
            continue
        echo(
            f"[{spec.name}] cxrflow ensemble --method {spec.method} ({', '.join(f'{r}:{c}' for r, c in spec.members)})"
        )
        try:
            metrics = build_ensemble(evals, folder, method=spec.method, n_boot=n_boot, overwrite=True,
                                     audit=ensemble_audit())  # fmt: skip
        except CxrflowError as exc:
            failed[spec.name] = str(exc)
            continue
        log_ensemble(request_from_argv(tracking), metrics)
        built.append(folder)
    return built, failed


def load_sweep(path: str | os.PathLike, *, store: str | os.PathLike | None = None) -> Sweep:
    """Read and validate a sweep file (.yaml, .yml, .toml or .json)."""
    return parse_sweep(read_config_file(path), source=str(path), store=store)


def check_stores(sweep: Sweep) -> None:
    """Fail before any training when a run's store, size or split is missing (one clear error)."""
    from cxrflow.data.store import check_partition, read_manifest

    manifests: dict[str, dict] = {}
    for spec in sweep.runs:
        if spec.config.multi_store:
            from cxrflow.data.storeset import open_stores

            open_stores(spec.config.all_stores(), spec.config.size)
        store = spec.config.store
        if store not in manifests:
            manifests[store] = read_manifest(store)
        for split in ("train", "val", "test"):
            check_partition(manifests[store], store, spec.config.size, split)


# --------------------------------------------------------------------------------------------------
# what is left to do


def run_dir(out: str | os.PathLike, name: str) -> Path:
    return Path(out) / "runs" / name


def _check_same_settings(spec: RunSpec, folder: Path) -> None:
    """A run folder started by an earlier sweep must have been started with the same settings."""
    saved_path = folder / "config.json"
    if not saved_path.is_file():
        return

    try:
        saved = safeio.read_json(saved_path, "run config", safeio.CONFIG_BYTES)
    except (OSError, ValueError, RecursionError):
        return  # the trainer reports an unreadable config itself
    wanted = spec.config.to_dict()
    differ = [k for k in wanted if k not in _FREE_SETTINGS and k in saved and saved[k] != wanted[k]]
    if differ:
        shown = ", ".join(f"{k}: run has {saved[k]!r}, sweep wants {wanted[k]!r}" for k in differ[:4])
        raise CxrflowError(
            f"run {spec.name!r} was started with other settings ({shown}); remove the folder to retrain it "
            "or use another --out",
            folder,
        )


def plan_steps(
    spec: RunSpec, out: Path, *, device: str, n_boot: int, tracking: Sequence[str] = (), quiet: bool = True
) -> list[list[str]]:
    """The ``cxrflow`` command lines still needed for one run (empty when it is complete).

    ``tracking``: options added to every step (``--mlflow URI``); ``quiet``: training without its
    progress bars (steps whose output goes to a log file)."""
    folder = run_dir(out, spec.name)
    _check_same_settings(spec, folder)
    steps: list[list[str]] = []
    if not (folder / "done.json").is_file():
        config_file = out / "configs" / f"{spec.name}.json"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(config_file, {k: v for k, v in spec.config.to_dict().items() if k != "out"})
        train = [
            "train",
            "--config",
            str(config_file),
            "--out",
            str(folder),
            *(["--quiet"] if quiet else []),
            "--device",
            device,
        ]
        if folder.exists():
            train.append("--resume")
        steps.append([*train, *tracking])
    training = bool(steps)  # training changes the checkpoints, so any evaluation of them is redone
    for ckpt in spec.evaluate:
        metrics = default_eval_dir(folder, "test", ckpt) / METRICS_NAME
        if training or not metrics.is_file() or evaluation_status(metrics) is not None:
            steps.append(
                ["evaluate", "--run", str(folder), "--checkpoint", ckpt, "--split", "test",
                 "--n-boot", str(n_boot), "--device", device, "--overwrite", *tracking]
            )  # fmt: skip
    return steps


# --------------------------------------------------------------------------------------------------
# running


def visible_gpus() -> list[str]:
    """GPU indices this process may use (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [g.strip() for g in listed.split(",") if g.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


@dataclass
class _Job:
    name: str
    steps: deque
    log: Path
    failed: str | None = None


def _run_in_process(argv: list[str], echo: Callable[[str], None]) -> int:
    from cxrflow.cli import main

    echo(f"$ cxrflow {' '.join(argv)}")
    return main(argv)


def cxrflow_command(argv: list[str]) -> list[str]:
    """The subprocess command line of one ``cxrflow`` step (this interpreter, this cxrflow)."""
    return [sys.executable, "-m", "cxrflow.cli", *argv]


def run_sweep(
    sweep: Sweep,
    out: str | os.PathLike,
    *,
    device: str = "auto",
    gpus: Sequence[str] | None = None,
    n_boot: int | None = None,
    in_process: bool = False,
    echo: Callable[[str], None] = print,
    explore: str | os.PathLike | None = None,
    launch: SparkLaunch | None = None,
    tracking: Sequence[str] = (),
) -> dict[str, Any]:
    """Bring every run of ``sweep`` to trained + evaluated, then write the report.

    ``device``: ``auto`` (GPUs when present), ``cuda`` or ``cpu``. Steps run in this process show
    their progress on this terminal; steps in subprocesses write log files. With GPUs, one run per GPU in
    parallel (``gpus`` restricts which). ``in_process`` runs the steps one after another in this
    process (no subprocess start-up; a crash then stops the sweep). Returns a summary with the
    report's paths, the runs done now, skipped and failed. ``explore``: an ``explore`` output folder
    for the report's data section.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise CxrflowError(f"--device must be auto, cpu or cuda, got {device!r}")
    n_boot = int(n_boot if n_boot is not None else sweep.extra.get("n_boot", 1000))
    try:
        options.check_n_boot(n_boot)
    except ValueError as exc:
        raise CxrflowError(str(exc), sweep.source) from None
    check_stores(sweep)
    out = Path(out)
    stores = {str(store) for s in sweep.runs for store in s.config.all_stores()}
    with claiming(out, "sweep", resume=True, inputs=[sweep.source, *stores], legacy=("sweep.json",)):
        return _run_sweep(
            sweep,
            out,
            device=device,
            gpus=gpus,
            n_boot=n_boot,
            in_process=in_process,
            echo=echo,
            explore=explore,
            launch=launch,
            tracking=tracking,
        )


def _run_sweep(
    sweep: Sweep, out: Path, *, device, gpus, n_boot: int, in_process: bool, echo, explore, launch, tracking
) -> dict[str, Any]:
    """The body of :func:`run_sweep`, with the sweep folder claimed."""
    from cxrflow.results.report import write_report

    (out / "logs").mkdir(exist_ok=True)
    slots = _slots(device, gpus, in_process=in_process, launch=launch)
    _write_sweep_record(sweep, out, n_boot)
    jobs: list[_Job] = []
    skipped: list[str] = []
    if launch is not None:
        step_device = launch.device
    elif slots != [None]:
        step_device = "cuda"  # each subprocess sees its one GPU
    else:
        step_device = device if in_process else "cpu"
    for spec in sweep.runs:
        steps = plan_steps(spec, out, device=step_device, n_boot=n_boot, tracking=tracking, quiet=not in_process)
        if steps:
            jobs.append(_Job(spec.name, deque(steps), out / "logs" / f"{spec.name}.log"))
        else:
            skipped.append(spec.name)
    if skipped:
        echo(f"already trained and evaluated: {', '.join(skipped)}")
    if jobs:
        where = _where(slots, in_process=in_process, launch=launch)
        echo(f"{len(jobs)} run(s) to train/evaluate {where}: {', '.join(j.name for j in jobs)}")
    started = time.perf_counter()
    if in_process:
        for job in jobs:
            while job.steps:
                argv = job.steps.popleft()
                if _run_in_process(argv, echo) != 0:
                    job.failed = f"'cxrflow {argv[0]}' failed"
                    break
    elif launch is not None:
        if jobs:
            run_sweep_jobs(jobs, launch, echo, cxrflow_command)
    else:
        _run_subprocesses(jobs, slots, echo)
    failed = {j.name: j.failed for j in jobs if j.failed}
    evaluated = [
        run_dir(out, s.name)
        for s in sweep.runs
        if any((default_eval_dir(run_dir(out, s.name), "test", c) / METRICS_NAME).is_file() for c in s.evaluate)
    ]
    ensembles, ensemble_failed = build_sweep_ensembles(sweep, out, n_boot=n_boot, echo=echo, tracking=tracking)
    failed.update(ensemble_failed)
    evaluated += ensembles
    report = None
    if evaluated:
        report = write_report(evaluated, out / "report", split="test", overwrite=True, explore=explore)
    summary = {
        "out": str(out),
        "trained_or_evaluated_now": [j.name for j in jobs if not j.failed],
        "skipped": skipped,
        "failed": failed,
        "seconds": time.perf_counter() - started,
        "report": None if report is None else {k: report[k] for k in ("report_html", "table_md", "table_csv", "comparison_png")},
        "best": None if report is None or report["best"] is None else {
            k: report["best"][k] for k in ("run", "model", "size", "stage", "mean_auc", "ci_low", "ci_high")},
    }  # fmt: skip
    return summary


def _slots(device: str, gpus, *, in_process: bool, launch: SparkLaunch | None) -> list[str | None]:
    """Where the runs go at once: one slot per GPU, or ``[None]`` (one run at a time, no GPU chosen)."""
    if device == "cpu" or in_process or launch is not None:
        return [None]
    found = list(gpus) if gpus else visible_gpus()
    if device == "cuda" and not found:
        raise CxrflowError("--device cuda but no CUDA GPU is visible; use --device cpu or auto")
    return found or [None]


def _write_sweep_record(sweep: Sweep, out: Path, n_boot: int) -> None:
    """``OUT/sweep.json``: the sweep's source, its resolved runs and the bootstrap count."""
    write_json_atomic(
        out / "sweep.json",
        {
            "source": sweep.source,
            "runs": [
                {
                    "name": s.name,
                    "evaluate": s.evaluate,
                    "config": {**s.config.to_dict(), "out": str(run_dir(out, s.name))},
                }
                for s in sweep.runs
            ],
            "n_boot": n_boot,
        },
    )


def _where(slots: list[str | None], *, in_process: bool, launch: SparkLaunch | None) -> str:
    """Where the runs are trained and evaluated, in words."""
    if launch is not None:
        return f"on Spark ({launch.master})"
    if in_process:
        return "in this process"
    if slots != [None]:
        return f"on GPU {', '.join(s for s in slots if s is not None)}"
    return "on CPU, one at a time"


def _run_subprocesses(
    jobs: list[_Job],
    slots: list[str | None],
    echo: Callable[[str], None],
    command: Callable[[list[str]], list[str]] = cxrflow_command,
) -> None:
    """Run each job's steps in order, one job per slot at a time (slot = GPU index or None for CPU).

    A job keeps its slot (GPU) for all its steps; its output goes to its log file.
    """
    pending = deque(jobs)
    active: dict[int, tuple[_Job, subprocess.Popen, Any]] = {}

    def start(slot_index: int, job: _Job) -> None:
        argv = job.steps.popleft()
        env = dict(os.environ)
        gpu = slots[slot_index]
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        log = open(job.log, "a")
        log.write(f"\n$ cxrflow {' '.join(argv)}\n")
        log.flush()
        echo(f"[{job.name}] cxrflow {argv[0]}{'' if gpu is None else f' (GPU {gpu})'}; log: {job.log}")
        proc = subprocess.Popen(command(argv), stdout=log, stderr=subprocess.STDOUT, env=env)
        active[slot_index] = (job, proc, log)

    def stop_all(signum=None, frame=None):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop_all) if _main_thread() else None
    try:
        while pending or active:
            for i in range(len(slots)):
                if i not in active and pending:
                    start(i, pending.popleft())
            time.sleep(0.2)
            for i, (job, proc, log) in list(active.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del active[i]
                if rc != 0:
                    job.failed = f"exit status {rc}; see {job.log}"
                    echo(f"[{job.name}] failed ({job.failed})")
                elif job.steps:
                    start(i, job)
                else:
                    echo(f"[{job.name}] done")
    finally:
        for _job, proc, _log in active.values():
            if proc.poll() is None:
                proc.terminate()
        for _job, proc, _log in active.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
