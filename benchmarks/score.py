"""Spark batch scoring (``cxrflow predict --store --out``) beside the single-process predict loop.

Writes a synthetic store of ``--images`` test rows at ``--size`` px (``--rows-per-file`` per Parquet
file, so one Spark task per file) and a run holding a randomly initialised ``--model`` checkpoint,
then, in the same run, on the same rows:

1. baseline: one process, one torch thread, the predict loop: each store file read and scored by
   :func:`cxrflow.results.score.score_pixels` (the predictor ``cxrflow predict`` uses);
2. the Spark job on ``--master`` (:func:`cxrflow.results.batchscore.run_batch`, one torch thread per
   task), timed after a warm-up job into the same folder that starts the Python workers and loads
   the model into each (once per worker, as for any long job): reading, scoring, writing Parquet.

Prints images/s for both, their ratio and the target (0.8 x the loop x the master's cores). The
best of ``--rounds`` rounds counts (the round least disturbed by other work on a shared machine).
On a machine shared with other work the cores are not free, so it also prints the CPU seconds per
image of the loop and of the Spark tasks (each task's own ``process_time``, measured by one more job
that runs the same :func:`~cxrflow.results.batchscore.score_unit`): their ratio is what the job
costs over the loop per image, and 2 free cores run the job at ``cores x loop / that ratio``.

    python benchmarks/score.py --images 1024 --size 64 --model resnet50 --master 'local[2]'
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path


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


def loop(run: Path, store: Path, size: int) -> tuple[float, float, int]:
    """The single-process predict loop over the store's test files; (seconds, CPU seconds, images)."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from cxrflow.data.demographics import encode_arrow
    from cxrflow.data.store import split_dir
    from cxrflow.results.predict import load_predictor
    from cxrflow.results.score import score_pixels

    torch.set_num_threads(1)
    predictor = load_predictor(run)
    start, cpu, n = time.perf_counter(), time.process_time(), 0
    for file in sorted(split_dir(store, size, "test").glob("*.parquet")):
        table = pq.read_table(file, columns=["image_id", "pixels", "age", "sex", "view"])
        pixels = np.stack([np.frombuffer(v, np.uint8) for v in table.column("pixels").to_pylist()]).reshape(
            -1, size, size
        )
        score_pixels(predictor, pixels, encode_arrow(table.column("age"), table.column("sex"), table.column("view")))
        n += len(pixels)
    return time.perf_counter() - start, time.process_time() - cpu, n


def _task_cpu(model_dir: str, stamp: str, out: str, unit: dict) -> tuple[float, int]:
    from cxrflow.results.batchscore import score_unit

    cpu = time.process_time()
    _, rows, _ = score_unit(model_dir, stamp, out, unit)
    return time.process_time() - cpu, rows


def spark_cpu_per_image(spark, out: Path, size: int, store: Path) -> float:
    """CPU seconds per image of the Spark tasks, scoring the units of ``out`` again in place."""
    import functools
    import json

    from cxrflow.results.batchscore import MODEL_DIR, RECORD_NAME, _units_of_store

    record = json.loads((out / RECORD_NAME).read_text())
    stamp = f"{record['checkpoint_sha256']}:{json.dumps(record['spec'], sort_keys=True)}"
    units = _units_of_store(str(store), size, ["test"])
    task = functools.partial(_task_cpu, str(out / MODEL_DIR), stamp, str(out))
    done = spark.sparkContext.parallelize(units, len(units)).map(task).collect()
    return sum(c for c, _ in done) / sum(n for _, n in done)


def spark_job(spark, run: Path, store: Path, out: Path) -> float:
    """Seconds of one batch-scoring job of the test split into ``out`` (emptied first) on the running session."""
    import shutil

    from cxrflow.results.batchscore import run_batch
    from cxrflow.results.predict import load_predictor

    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(run=str(run), checkpoint=None, store=str(store), out=str(out), split="test", data=None,
                              format="auto", spark_master="unused", resume=False, images=[])  # fmt: skip
    predictor = load_predictor(run)
    start = time.perf_counter()
    run_batch(args, predictor)
    return time.perf_counter() - start


def _cores(master: str) -> int:
    found = re.fullmatch(r"local\[(\d+|\*)\]", master)
    if not found:
        raise SystemExit(f"--master must be local[N] for this benchmark, got {master!r}")
    return os.cpu_count() or 1 if found.group(1) == "*" else int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--rows-per-file", type=int, default=128)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    cores = _cores(args.master)
    from cxrflow.data.spark import spark_session

    with tempfile.TemporaryDirectory(prefix="cxrflow-bench-score-") as tmp:
        root = Path(tmp)
        run, store = make_run(root, args.model, args.size, args.images, args.rows_per_file)
        loops, jobs = [], []
        with spark_session(args.master, "cxrflow-bench-score", conf={"spark.default.parallelism": str(cores)}) as spark:
            spark.sparkContext.parallelize(range(cores * 4), cores).map(lambda x: x).count()  # start the workers
            spark_job(spark, run, store, root / "out")
            cpu_loop = []
            for _ in range(args.rounds):
                seconds, cpu, n = loop(run, store, args.size)
                loops.append(n / seconds)
                cpu_loop.append(cpu / n)
                jobs.append(args.images / spark_job(spark, run, store, root / "out"))
            cpu_job = spark_cpu_per_image(spark, root / "out", args.size, store)
        best_loop, best_job = max(loops), max(jobs)
        target = 0.8 * best_loop * cores
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(
            f"{args.images} images, {args.model} at {args.size} px, {args.rows_per_file} per task; load average {load}"
        )
        print(f"predict loop, 1 process, 1 thread : {best_loop:8.1f} images/s")
        print(f"Spark job on {args.master:<14}     : {best_job:8.1f} images/s  ({best_job / best_loop:.2f}x the loop)")
        print(
            f"target 0.8 x loop x {cores} cores      : {target:8.1f} images/s  -> {'met' if best_job >= target else 'NOT met'}"
        )
        ratio = cpu_job / min(cpu_loop)
        print(
            f"CPU per image: loop {min(cpu_loop) * 1000:.1f} ms, Spark task {cpu_job * 1000:.1f} ms ({ratio:.2f}x); "
            f"on {cores} free cores the job would run at {cores / ratio:.2f}x the loop"
        )


if __name__ == "__main__":
    main()
