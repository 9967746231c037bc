"""Full resolution in the ETL: images/s and store bytes per image at 1024 px beside 512 px, same run.

Generates a synthetic release of N 1024x1024 PNGs (the NIH release's own size, so 1024 is a decode
without a resize), starts one Spark session, then runs the ETL at ``--sizes 512`` and at
``--sizes 1024`` interleaved for ``--rounds`` rounds (the best round of each counts, as in
``benchmarks/etl.py``), and once at every size together (``256,512,1024``) to show a mix works.
Prints images/s of the Spark job, Parquet bytes per image of each size, and the 1024/512 ratios.
Synthetic images compress better than radiographs, so bytes per image are a lower bound for real data.

    python benchmarks/etl_sizes.py --images 200 --master 'local[2]' --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path


def store_bytes_per_image(store: Path, size: int, rows: int) -> float:
    """Parquet bytes of every split at ``size`` over the images written."""
    files = (store / f"size={size}").rglob("*.parquet")
    return sum(f.stat().st_size for f in files) / max(rows, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="about this many images (patients x 3.6)")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default=None, help="folder for the data (default: a temporary one)")
    args = parser.parse_args()

    from cxrflow.data.etl import run_etl
    from cxrflow.data.spark import build_spark
    from cxrflow.data.synth import synthesize

    work = Path(args.work or tempfile.mkdtemp(prefix="cxrflow-etl-sizes-"))
    release = work / "release"
    if not release.is_dir():
        synthesize(release, patients=max(1, round(args.images / 3.6)), size=1024, seed=0)
    spark = build_spark(args.master, "cxrflow etl sizes benchmark")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"Spark {args.master}, best of {args.rounds} rounds, load average at start {load}")
    best: dict[int, dict] = {}
    try:
        for round_no in range(1, args.rounds + 1):
            for size in (512, 1024):
                out = work / f"store-{size}"
                manifest = run_etl(release, out, [size], spark=spark, overwrite=True)
                rate = manifest["images_per_second"]
                written = manifest["source"]["written"]
                print(f"round {round_no}: {size:>4} px  {rate:7.1f} images/s  ({written} images)", flush=True)
                if size not in best or rate > best[size]["rate"]:
                    best[size] = {"rate": rate, "bytes": store_bytes_per_image(out, size, written)}
        mixed = run_etl(release, work / "store-mixed", [256, 512, 1024], spark=spark, overwrite=True)
    finally:
        spark.stop()
    print(f"\n{'size':>5} {'images/s':>9} {'KiB/image':>10}")
    for size in (512, 1024):
        print(f"{size:>5} {best[size]['rate']:>9.1f} {best[size]['bytes'] / 1024:>10.1f}")
    print(
        f"1024/512: speed {best[1024]['rate'] / best[512]['rate']:.2f}x, bytes {best[1024]['bytes'] / best[512]['bytes']:.2f}x"
    )
    n = mixed["source"]["written"]
    per_size = ", ".join(
        f"{s} px {store_bytes_per_image(work / 'store-mixed', s, n) / 1024:.1f} KiB" for s in (256, 512, 1024)
    )
    print(f"mixed 256,512,1024: {mixed['images_per_second']:.1f} images/s; per image {per_size}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
