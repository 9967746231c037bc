"""Spark batch scoring (``cxrflow predict --store --out``) beside the single-process predict loop.

Writes a synthetic store of ``--images`` test rows at ``--size`` px (``--rows-per-file`` per Parquet
file, so one Spark task per file) and a run holding a randomly initialised ``--model`` checkpoint,
then, in the same run, on the same rows, round after round:

1. the predict loop, one process: each store file read and scored by
   :func:`cxrflow.results.score.score_pixels` with the predictor and batch size (32) of
   ``cxrflow predict``, twice: on one torch thread (one core: the baseline the target is defined
   on, "0.8 x the loop x the cores") and on torch's default thread count, which is what
   ``cxrflow predict`` itself runs with (it sets none; torch takes one per core);
2. the Spark job on ``--master`` (:func:`cxrflow.results.batchscore.run_batch`: one torch thread
   per task), timed right after a warm-up job into the same folder that starts the Python workers
   and loads the model into each (once per worker, as for any long job; PySpark stops a worker
   idle for a minute, so the warm-up comes just before): reading, scoring, writing Parquet.

The best round of each counts (the one least disturbed by other work on a shared machine). It
prints images/s, their ratios, the load average and one verdict line. Because a shared machine's
cores are not free, it also prints CPU seconds per image: the loop's process, and the whole Spark
job's (the driver, the JVM and its Python workers, read from ``/proc``): their ratio is what the
job costs over the loop per image, and N free cores run the job at ``N x loop / that ratio``.

    python benchmarks/score.py                     # defaults: 1024 images, densenet121 at 64 px, local[2]
    python benchmarks/score.py --images 2048 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

#: ``cxrflow predict``'s default batch size (``--batch-size``).
PREDICT_BATCH = 32


def make_run(root: Path, model: str, size: int, images: int, rows_per_file: int) -> tuple[Path, Path]:
    """A store with ``images`` test rows and a run whose best_finetune.pt is an untrained ``model``."""
    import torch

    from cxrflow.data.labels import NIH14
    from cxrflow.modelling.models import create_model
    from cxrflow.testing.synthstore import write_synthetic_store

    store = root / "store"
    write_synthetic_store(
        store, sizes=(size,), rows={"train": 16, "val": 16, "test": images}, rows_per_file=rows_per_file
    )
    names = list(NIH14.names)
    net = create_model(model, len(names), pretrained="none")
    run = root / "run"
    run.mkdir()
    config = {"model": model, "size": size, "store": str(store), "pixel_mean": 0.5, "pixel_std": 0.25}
    torch.save({"model": net.state_dict(), "config": config, "label_names": names, "stage": "finetune", "epoch": 1},
               run / "best_finetune.pt")  # fmt: skip
    return run, store


def loop(
    run: Path, store: Path, size: int, threads: int, files: int | None = None, channels_last: bool = False
) -> tuple[float, float, int]:
    """The single-process predict loop over the store's test files (the first ``files`` of them,
    when given) on ``threads`` torch threads, the weights channels-last where the Spark tasks
    would keep them so with ``channels_last``; (seconds, CPU seconds, images)."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from cxrflow.data.demographics import encode_arrow
    from cxrflow.data.store import split_dir
    from cxrflow.results.predict import load_predictor
    from cxrflow.results.score import score_pixels

    torch.set_num_threads(threads)
    predictor = load_predictor(run)
    if channels_last:
        from cxrflow.results.batchscore import use_channels_last

        use_channels_last(predictor)
    start, cpu, n = time.perf_counter(), time.process_time(), 0
    for file in sorted(split_dir(store, size, "test").glob("*.parquet"))[:files]:
        table = pq.read_table(file, columns=["image_id", "pixels", "age", "sex", "view"])
        pixels = np.stack([np.frombuffer(v, np.uint8) for v in table.column("pixels").to_pylist()]).reshape(
            -1, size, size
        )
        demo = encode_arrow(table.column("age"), table.column("sex"), table.column("view"))
        score_pixels(predictor, pixels, demo, batch_size=PREDICT_BATCH)
        n += len(pixels)
    return time.perf_counter() - start, time.process_time() - cpu, n


def _tree_cpu(pid: int) -> float:
    """CPU seconds of process ``pid`` and every live process under it, from ``/proc``; NaN where
    ``/proc`` is not there. (Not the counts of reaped children: a worker that ends would add its
    whole life to its parent's.)"""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        threads = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return float("nan") if not Path("/proc/self").exists() else 0.0  # no /proc, or the process just ended
    children = []
    for thread in threads:  # a JVM starts its children (the Python workers' daemon) from any of its threads
        try:
            children += (thread / "children").read_text().split()
        except OSError:  # a thread that ended while we read
            continue
    own = sum(int(f) for f in fields[11:13]) / tick  # utime, stime
    return own + sum(_tree_cpu(int(c)) for c in children)


def spark_job(spark, run: Path, store: Path, out: Path) -> tuple[float, float]:
    """(seconds, driver CPU seconds) of one batch-scoring job of the test split into ``out``
    (emptied first) on the running session."""
    import shutil

    from cxrflow.results.batchscore import run_batch
    from cxrflow.results.predict import load_predictor

    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(run=str(run), checkpoint=None, store=str(store), out=str(out), split="test", data=None,
                              format="auto", spark_master="unused", resume=False, images=[])  # fmt: skip
    predictor = load_predictor(run)
    start, cpu = time.perf_counter(), time.process_time()
    run_batch(args, predictor)
    return time.perf_counter() - start, time.process_time() - cpu


def _cores(master: str) -> int:
    found = re.fullmatch(r"local\[(\d+|\*)\]", master)
    if not found:
        raise SystemExit(f"--master must be local[N] for this benchmark, got {master!r}")
    return os.cpu_count() or 1 if found.group(1) == "*" else int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model", default="densenet121", help="default: densenet121, the project's default model")
    parser.add_argument("--rows-per-file", type=int, default=128)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--rounds", type=int, default=2, help="the best round counts (default: 2)")
    args = parser.parse_args()
    cores = _cores(args.master)
    import torch

    from cxrflow.data.spark import spark_session

    default_threads = torch.get_num_threads()  # what cxrflow predict runs with: it sets no thread count
    with tempfile.TemporaryDirectory(prefix="cxrflow-bench-score-") as tmp:
        root = Path(tmp)
        run, store = make_run(root, args.model, args.size, args.images, args.rows_per_file)
        one, layout, many, jobs = [], [], [], []
        with spark_session(args.master, "cxrflow-bench-score", conf={"spark.default.parallelism": str(cores)}) as spark:
            jvm = spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid()
            for _ in range(args.rounds):
                # warm-up right before the timed job: PySpark stops a Python worker idle for a minute,
                # which a loop on a busy machine can outlast
                spark_job(spark, run, store, root / "out")
                before = _tree_cpu(jvm)
                seconds, driver = spark_job(spark, run, store, root / "out")
                jobs.append((seconds, _tree_cpu(jvm) - before + driver, driver))
                one.append(loop(run, store, args.size, 1))
                layout.append(loop(run, store, args.size, 1, channels_last=True))
                # a quarter of the rows: on a busy machine, threads that wait on each other are slow
                many.append(
                    loop(run, store, args.size, default_threads, max(1, args.images // args.rows_per_file // 4))
                )
        report(args, cores, default_threads, one, layout, many, jobs, _channels_last(run))


def _channels_last(run: Path) -> bool:
    """Whether the Spark tasks keep this model's weights channels-last (the same probe they run)."""
    from cxrflow.results.batchscore import use_channels_last
    from cxrflow.results.predict import load_predictor

    return use_channels_last(load_predictor(run))


def report(
    args, cores: int, default_threads: int, one: list, layout: list, many: list, jobs: list, channels_last: bool
) -> None:
    """Print the figures (best round of each) and the one-line verdict."""
    rate = {name: max(n / s for s, _, n in runs) for name, runs in (("one", one), ("layout", layout), ("many", many))}
    cpu = {name: min(c / n for _, c, n in runs) for name, runs in (("one", one), ("layout", layout))}
    job = max(args.images / s for s, _, _ in jobs)
    cpu_job = min(c / args.images for _, c, _ in jobs)
    cpu_driver = min(d / args.images for _, _, d in jobs)
    kept = "channels-last" if channels_last else "contiguous (channels-last failed the probe)"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = [
        ("predict loop, 1 torch thread", rate["one"], "the per-core baseline"),
        (f"predict loop, {default_threads} torch threads", rate["many"],
         f"torch's default, as cxrflow predict runs (it sets no thread count); {many[0][2]} images"),
        (f"predict loop, 1 torch thread, {kept.split()[0]}", rate["layout"], "the Spark tasks' weight layout alone"),
        (f"Spark job on {args.master}, 1 thread per task", job, f"weights {kept}"),
    ]  # fmt: skip
    print(f"{args.images} images, {args.model} at {args.size} px, {args.rows_per_file} per task, "
          f"best of {args.rounds} round(s); load average {load}")  # fmt: skip
    for label, value, note in rows:
        print(f"{label:<46}: {value:8.1f} images/s  ({note})")
    print(f"CPU per image: loop {cpu['one'] * 1000:.1f} ms ({cpu['layout'] * 1000:.1f} ms in the tasks' layout), "
          f"Spark job {cpu_job * 1000:.1f} ms (driver {cpu_driver * 1000:.1f} ms, the rest JVM and Python workers): "
          f"{cpu_job / cpu['one']:.2f}x the loop's, {cpu_job / cpu['layout']:.2f}x in the same layout; on {cores} free "
          f"cores the job runs at about {cores * cpu['one'] / cpu_job:.2f}x the 1-thread loop")  # fmt: skip
    target = 0.8 * cores
    print(f"verdict: {'MET' if job >= target * rate['one'] else 'NOT MET'}: Spark {job / rate['one']:.2f}x the "
          f"1-thread loop (target >= 0.8 x {cores} cores = {target:.2f}x), {job / rate['layout']:.2f}x the loop in the "
          f"tasks' layout, {job / rate['many']:.2f}x the {default_threads}-thread loop; load average {load}")  # fmt: skip


if __name__ == "__main__":
    main()
