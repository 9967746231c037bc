"""ETL throughput beside its floor: the Spark ETL against a bare single-process decode+resize loop.

Generates a synthetic release of about N 1024x1024 PNGs (``cxrflow.synth``), then, in the same
run and on the same files:

1. Pillow decode only, per image (real NIH PNGs decode at ~17 ms each on the reference 2-core
   machine; synthetic ones differ, so both are printed and the extrapolation is given both ways);
2. the bare loop: one process, ``cxrflow.imaging.load_and_resize`` (the ETL's own function) at
   every size, nothing written (the floor);
3. the full ETL (``run_etl``) at the same sizes on ``--master``.

Prints images/s for both, the ratio ETL / (bare x cores used) (target >= 0.8), and the time the
full 112,120-image release would take on this machine and on 8 workers x 4 cores.

    python benchmarks/etl.py --images 400 --sizes 256,512 --master 'local[*]'
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

RELEASE_IMAGES = 112_120
REAL_NIH_DECODE_MS = 17.0


def _load() -> str:
    try:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def _cores(master: str, default_parallelism: int) -> int:
    """Cores the ETL runs on: local[N] -> N, local[*] -> CPUs, local-cluster[w,c,m] -> w*c, else ``default_parallelism``."""
    import re

    if master in ("local",):
        return 1
    m = re.fullmatch(r"local\[(\*|\d+)(?:,\s*\d+)?\]", master)
    if m:
        return os.cpu_count() or 1 if m.group(1) == "*" else int(m.group(1))
    m = re.fullmatch(r"local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,\s*\d+\s*\]", master)
    if m:
        return int(m.group(1)) * int(m.group(2))
    return default_parallelism


def _tree_cpu_seconds(root: int) -> float | None:
    """CPU seconds (user + system, with waited-for children) of ``root`` and all its descendants
    (Linux /proc); None elsewhere. Under load, CPU time is a fairer cost than wall time."""
    try:
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    text = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                fields = text[text.rindex(")") + 2 :].split()
                stats[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0))[1]
        todo.extend(p for p, (parent, _) in stats.items() if parent == pid)
    return total / tick


def _bare(paths: list[str], sizes: list[int]) -> int:
    from cxrflow.imaging import load_and_resize

    for p in paths:
        load_and_resize(p, sizes)
    return len(paths)


def _plain_pillow(path: str, sizes: list[int]) -> None:
    """What a user would write with Pillow alone: open, convert to gray, Lanczos-resize each size."""
    from PIL import Image

    with Image.open(path) as im:
        gray = im.convert("L")
        for s in sizes:
            gray.resize((s, s), Image.Resampling.LANCZOS)


def _warm_worker(_: int) -> None:
    import cxrflow.etl  # noqa: F401  (what an ETL task imports first)

    time.sleep(0.5)  # keep this worker busy so each core starts its own


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600, help="about this many synthetic images (default 600)")
    parser.add_argument("--image-size", type=int, default=1024, help="side of the synthetic PNGs (default 1024)")
    parser.add_argument("--sizes", default="256,512", help="ETL sizes (default 256,512)")
    parser.add_argument("--master", default="local[*]", help="Spark master (default local[*])")
    parser.add_argument("--compression", default="zstd", help="Parquet compression (default zstd)")
    parser.add_argument("--rows-per-file", type=int, default=None, help="ETL images per task/file (default automatic)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the data (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated data and store")
    args = parser.parse_args(argv)

    from PIL import Image

    from cxrflow.etl import parse_sizes, run_etl
    from cxrflow.imaging import load_and_resize
    from cxrflow.metadata import find_images
    from cxrflow.spark import build_spark
    from cxrflow.synth import synthesize

    sizes = parse_sizes(args.sizes)
    work = args.work or Path(tempfile.mkdtemp(prefix="cxrflow-bench-etl-"))
    work.mkdir(parents=True, exist_ok=True)
    release, store = work / "release", work / "store"
    print(f"machine: {os.cpu_count()} CPUs, {_load()}")
    try:
        if not (release / "Data_Entry_2017_v2020.csv").exists():
            t = time.perf_counter()
            info = synthesize(release, patients=max(1, math.ceil(args.images / 3.6)), size=args.image_size, seed=0)
            print(f"generated {info['images']} synthetic {args.image_size}px PNGs in {time.perf_counter() - t:.1f} s")
        paths = [str(p) for _, p in sorted(find_images(release).items())]
        n = len(paths)
        mb = sum(os.path.getsize(p) for p in paths) / n / 2**20
        for p in paths:  # warm the page cache for both contenders
            Path(p).read_bytes()

        # 1. Pillow decode only
        t = time.perf_counter()
        for p in paths:
            with Image.open(p) as im:
                im.load()
        decode_ms = 1000 * (time.perf_counter() - t) / n

        cores = _cores(args.master, os.cpu_count() or 1)

        # 1b. plain Pillow (default Lanczos, no block reduction): the per-core rate to beat
        t = time.perf_counter()
        for p in paths:
            _plain_pillow(p, sizes)
        pillow_ips = n / (time.perf_counter() - t)

        # 2. the floor: one process, the ETL's own decode+resize function, nothing written
        t, cpu = time.perf_counter(), time.process_time()
        for p in paths:
            load_and_resize(p, sizes)
        bare_s = time.perf_counter() - t
        bare_cpu_ms = 1000 * (time.process_time() - cpu) / n
        bare_ips = n / bare_s
        # 2b. the same loop in as many processes as the ETL has cores, at the same time (what this
        # machine can do right now; on a machine shared with other work it is less than bare x cores)
        t = time.perf_counter()
        with multiprocessing.get_context("spawn").Pool(cores) as pool:
            pool.map(functools.partial(_bare, sizes=sizes), [paths[i::cores] for i in range(cores)])
        pool_ips = n / (time.perf_counter() - t)
        print(f"{n} images, {mb:.2f} MB per PNG; Pillow decode {decode_ms:.1f} ms/image (real NIH PNGs: ~{REAL_NIH_DECODE_MS:.0f} ms)")
        print(f"bare loop (1 process, decode + resize to {sizes}): {bare_ips:.1f} images/s ({1000 / bare_ips:.1f} ms/image)")
        print(f"bare loop in {cores} processes at once: {pool_ips:.1f} images/s ({pool_ips / bare_ips:.2f} x one process)")

        # 3. the ETL
        t = time.perf_counter()
        spark = build_spark(args.master, "cxrflow-bench-etl")
        jvm_s = time.perf_counter() - t
        # start every core's Python worker (a fixed cost per executor, like the JVM's), so the job
        # rate below is the rate the full release runs at
        t = time.perf_counter()
        spark.sparkContext.parallelize(range(cores), cores).foreach(_warm_worker)
        workers_s = time.perf_counter() - t
        startup_s = jvm_s + workers_s
        jvm = getattr(getattr(spark.sparkContext, "_gateway", None), "proc", None)
        cpu_before = _tree_cpu_seconds(jvm.pid) if jvm is not None else None
        try:
            t = time.perf_counter()
            manifest = run_etl(
                release, store, sizes, spark=spark, overwrite=True, compression=args.compression,
                rows_per_file=args.rows_per_file,
            )  # fmt: skip
            etl_s = time.perf_counter() - t
            cpu_after = _tree_cpu_seconds(jvm.pid) if jvm is not None else None
        finally:
            spark.stop()
        job_s = manifest["spark_job_seconds"]
        etl_ips = n / job_s
        store_mb = sum(f.stat().st_size for f in store.rglob("*.parquet")) / 2**20
        ratio = etl_ips / (bare_ips * cores)
        print(
            f"ETL on {args.master} ({cores} cores): Spark start {jvm_s:.1f} s + Python workers {workers_s:.1f} s, "
            f"job {job_s:.1f} s "
            f"({etl_ips:.1f} images/s), run_etl total {etl_s:.1f} s, store {store_mb:.0f} MB ({args.compression})"
        )
        print(f"ratio ETL / (bare x {cores} cores) = {etl_ips:.1f} / ({bare_ips:.1f} x {cores}) = {ratio:.2f}  (target >= 0.8)")
        print(f"ratio ETL / bare in {cores} processes at once = {etl_ips / pool_ips:.2f}  (Spark's own overhead)")
        if cpu_before is not None and cpu_after is not None:
            etl_cpu_ms = 1000 * (cpu_after - cpu_before) / n
            print(
                f"CPU time per image: ETL {etl_cpu_ms:.1f} ms (JVM + Python workers) vs bare {bare_cpu_ms:.1f} ms: "
                f"CPU efficiency {bare_cpu_ms / etl_cpu_ms:.2f} (load-independent view of the same ratio)"
            )
        print(
            f"ETL tasks: {manifest['spark_tasks']} of {manifest['parquet']['rows_per_file']} images; busy "
            f"{manifest['task_seconds']:.1f} core-s, of which decode+resize {manifest['decode_resize_seconds']:.1f} s; "
            f"cores busy {100 * manifest['task_seconds'] / (job_s * cores):.0f}% of the job"
        )
        print(
            f"ETL per core: {etl_ips / cores:.1f} images/s vs plain Pillow (open, convert L, Lanczos each size) "
            f"{pillow_ips:.1f} images/s in one process: {etl_ips / cores / pillow_ips:.2f} x (target >= 1)"
        )

        # extrapolation: per-image cost as measured, and with the real NIH decode cost instead
        per_image_s = cores / etl_ips  # core-seconds per image in the ETL
        real_per_image_s = per_image_s + (REAL_NIH_DECODE_MS - decode_ms) / 1000
        print(f"full release ({RELEASE_IMAGES:,} images), Spark start-up added, same efficiency:")
        for label, c in ((f"this machine ({cores} cores)", cores), ("8 workers x 4 cores", 32)):
            synthetic_h = (startup_s + RELEASE_IMAGES * per_image_s / c) / 3600
            real_h = (startup_s + RELEASE_IMAGES * real_per_image_s / c) / 3600
            print(f"  {label:<26} {synthetic_h * 60:7.1f} min at the synthetic cost, {real_h * 60:7.1f} min at the real NIH decode cost")
        print(f"after: {_load()} (other work on the machine slows both contenders)")
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.keep:
            shutil.rmtree(store, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
