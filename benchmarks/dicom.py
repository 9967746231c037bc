"""DICOM decode and ETL throughput beside plain pydicom + Pillow, on the same generated files.

Generates ``--images`` 2048x2048 16-bit (12 bits stored) MONOCHROME2 radiograph-like DICOM files
per transfer syntax (explicit VR little endian = uncompressed, and lossless JPEG 2000 through
pylibjpeg-openjpeg), each with a window centre/width, then, in the same run, for each syntax:

1. baseline: plain pydicom + Pillow, one process: ``dcmread`` -> ``pixel_array`` -> ``>> 4`` to 8
   bits (no window) -> Pillow Lanczos to each size; what a user's own script does;
2. cxrflow's decode, one process: :func:`cxrflow.data.imaging.load_and_resize` (modality + window to
   8 bits, MONOCHROME1 rule, pad, Lanczos to each size): the same work done properly;
3. the full ETL (``run_etl`` on a generic ``labels.csv`` folder) on ``--master``: its Spark job's
   time (decode, resize, Parquet writing), after one warm-up run that starts the Python workers.

Prints images/s for each and the ratios cxrflow / baseline (decode loop) and ETL / baseline. The
best of ``--rounds`` rounds counts (the round least disturbed by other work on a shared machine).

    python benchmarks/dicom.py --images 8 --sizes 256 --master 'local[2]' --rounds 2
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _load() -> str:
    try:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def generate(root: Path, n: int, side: int, syntax: str, seed: int) -> list[Path]:
    """``n`` smooth 12-bit radiograph-like images (gradients + noise: compressible like real ones)."""
    from cxrflow.testing.synthformats import write_dicom

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    paths = []
    for i in range(n):
        body = 1800 + 1200 * np.exp(-((x - 0.5) ** 2 + (y - 0.55) ** 2) / 0.08) * (0.8 + 0.2 * rng.random())
        img = np.clip(body + rng.normal(0, 40, (side, side)), 0, 4095).astype(np.uint16)
        paths.append(
            write_dicom(
                root / "dcm" / f"{syntax}-{i:03d}.dcm", img, bits_stored=12, window=(2400, 2400), transfer_syntax=syntax
            )
        )
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "patient_id", "labels"])
        writer.writerows([p.relative_to(root).as_posix(), str(i), "A" if i % 2 else ""] for i, p in enumerate(paths))
    return paths


def baseline(paths: list[Path], sizes: list[int]) -> float:
    """Plain pydicom + Pillow, one process; returns seconds."""
    import pydicom
    from PIL import Image

    start = time.perf_counter()
    for path in paths:
        pixels = pydicom.dcmread(path).pixel_array
        im = Image.fromarray((pixels >> 4).astype(np.uint8))
        for s in sizes:
            im.resize((s, s), Image.Resampling.LANCZOS)
    return time.perf_counter() - start


def cxrflow_decode(paths: list[Path], sizes: list[int]) -> float:
    from cxrflow.data.imaging import load_and_resize

    start = time.perf_counter()
    for path in paths:
        load_and_resize(path, sizes)
    return time.perf_counter() - start


def etl(root: Path, out: Path, sizes: list[int], spark) -> float:
    """Seconds of the ETL's Spark job (metadata reading and the manifest are a fixed cost, not counted)."""
    from cxrflow.data.etl import run_etl

    manifest = run_etl(root, out, sizes, spark=spark, overwrite=True, format="csv")
    assert manifest["source"]["quarantined"] == 0, manifest["quarantined"]
    return manifest["spark_job_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="DICOM files per transfer syntax (default 8)")
    parser.add_argument("--side", type=int, default=2048, help="image side in pixels (default 2048)")
    parser.add_argument("--sizes", default="256", help="ETL sizes (default 256)")
    parser.add_argument("--master", default="local[2]", help="Spark master (default local[2])")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the best counts (default 2)")
    parser.add_argument("--syntaxes", default="explicit,jpeg2000", help="transfer syntaxes (default explicit,jpeg2000)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the data (default: temporary)")
    args = parser.parse_args()
    from cxrflow.data.spark import build_spark

    sizes = [int(s) for s in args.sizes.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="cxrflow-dicom-bench-"))
    spark = build_spark(args.master, "cxrflow dicom benchmark")
    try:
        for syntax in args.syntaxes.split(","):
            root = work / syntax
            paths = generate(root, args.images, args.side, syntax, seed=0)
            mb = sum(p.stat().st_size for p in paths) / len(paths) / 2**20
            best = {"baseline": float("inf"), "cxrflow": float("inf"), "etl": float("inf")}
            baseline(paths[:1], sizes), cxrflow_decode(paths[:1], sizes)  # imports, plugins: not timed
            etl(root, work / f"store-{syntax}", sizes, spark)  # Spark's Python workers start: not timed
            for r in range(args.rounds):
                times = {
                    "baseline": baseline(paths, sizes),
                    "cxrflow": cxrflow_decode(paths, sizes),
                    "etl": etl(root, work / f"store-{syntax}", sizes, spark),
                }
                print(
                    f"{syntax} round {r + 1}: "
                    + ", ".join(f"{k} {len(paths) / t:.2f} images/s" for k, t in times.items())
                )
                best = {k: min(best[k], times[k]) for k in best}
            rate = {k: len(paths) / t for k, t in best.items()}
            print(
                f"{syntax}: {len(paths)} files of {args.side}x{args.side}, {mb:.1f} MB each; best of {args.rounds}: "
                f"pydicom+Pillow {rate['baseline']:.2f}/s, cxrflow decode {rate['cxrflow']:.2f}/s "
                f"(ratio {rate['cxrflow'] / rate['baseline']:.2f}), ETL on {args.master} {rate['etl']:.2f}/s "
                f"(ratio {rate['etl'] / rate['baseline']:.2f}); {_load()}"
            )
    finally:
        spark.stop()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
