"""``cxrflow etl``: raw images to the multi-resolution Parquet store with Spark (:mod:`cxrflow.data.etl`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cxrflow import options
from cxrflow.data.etl import COMPRESSIONS, DECODE_THREADS
from cxrflow.data.formats import add_format_arguments
from cxrflow.names import printable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, type=Path, help="collection folder (NIH, CheXpert, MIMIC-CXR-JPG or labels.csv)"
    )
    parser.add_argument("--out", required=True, type=Path, help="store folder to write")
    parser.add_argument("--sizes", default="256,512", help="comma-separated image sides in pixels (default 256,512)")
    parser.add_argument("--master", default="local[*]", help="Spark master URL (default local[*])")
    options.add_val_fraction(parser)
    parser.add_argument(
        "--seed", type=options.seed, default=0, help="split seed, also of the stored row order (default 0)"
    )
    parser.add_argument(
        "--split-csv", type=Path, default=None,
        help="use exactly this split file (from 'cxrflow split --out'); default: the same split 'cxrflow split' computes",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    parser.add_argument(
        "--strict", action="store_true", help="fail on a missing or undecodable image instead of reporting it"
    )
    parser.add_argument("--verbose", action="store_true", help="show Spark's logs")
    parser.add_argument(
        "--rows-per-file", type=int, default=None, help="images per Parquet file and task (default: automatic)"
    )
    parser.add_argument(
        "--compression", default="zstd", choices=COMPRESSIONS, help="Parquet compression (default zstd)"
    )
    parser.add_argument(
        "--threads", type=int, default=DECODE_THREADS,
        help=f"threads per Spark task that decode and resize (default {DECODE_THREADS}; more for slow network storage)",
    )  # fmt: skip
    parser.add_argument("--driver-memory", default=None, help="Spark driver memory, e.g. 2g (default: Spark's)")
    parser.add_argument("--executor-memory", default=None, help="Spark executor memory, e.g. 4g (default: Spark's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress display")
    add_format_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from cxrflow.data.etl import run_etl
    from cxrflow.data.formats import say_left_out
    from cxrflow.data.store import format_manifest

    manifest = run_etl(
        args.data,
        args.out,
        args.sizes,
        args.master,
        val_fraction=args.val_fraction,
        seed=args.seed,
        overwrite=args.overwrite,
        strict=args.strict,
        verbose=args.verbose,
        rows_per_file=args.rows_per_file,
        compression=args.compression,
        threads=args.threads,
        driver_memory=args.driver_memory,
        executor_memory=args.executor_memory,
        progress=None if args.no_progress else sys.stderr,
        format=args.format,
        views=args.views,
        split_csv=args.split_csv,
    )
    print(printable(f"wrote {args.out}"))
    print(format_manifest(manifest))
    say_left_out(manifest.get("notes"))
    return 0
