"""``cxrflow sweep``: train, evaluate and report every run of a sweep file (:mod:`cxrflow.sweep`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cxrflow import options
from cxrflow.commands.common import must_exist
from cxrflow.commands.train import add_spark_arguments, launch_from_args
from cxrflow.tracking import add_arguments as add_tracking_arguments
from cxrflow.tracking import default_uri, request_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="sweep file (.yaml, .yml, .toml or .json), e.g. configs/paper.yaml")
    parser.add_argument("--out", required=True, help="sweep folder: runs/, logs/, report/ (re-run to continue)")
    parser.add_argument("--store", default=None, help="store folder (overrides the file's 'store')")
    options.add_device(parser)
    parser.add_argument("--gpus", default=None, help="comma-separated GPU indices to use (default: all visible)")
    parser.add_argument(
        "--n-boot",
        type=options.n_boot,
        default=None,
        help="bootstrap resamples per evaluation (default: the file's n_boot or 1000)",
    )
    parser.add_argument("--in-process", action="store_true", help="run every step in this process, one after another")
    add_tracking_arguments(parser)
    add_spark_arguments(parser)


def run(args: argparse.Namespace) -> int:
    must_exist([args.config], "no such config file")
    from cxrflow.sweep import load_sweep, run_dir, run_sweep

    launch = launch_from_args(args)
    request = request_from_args(args)
    tracking = (
        []
        if request.uri is None
        else ["--mlflow", request.uri or default_uri(args.out), "--mlflow-experiment", request.experiment]
    )
    sweep = load_sweep(args.config, store=args.store)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    summary = run_sweep(
        sweep,
        args.out,
        device=args.device,
        gpus=gpus,
        n_boot=args.n_boot,
        in_process=args.in_process,
        launch=launch,
        tracking=tracking,
    )
    if summary["report"]:
        print(f"report: {summary['report']['report_html']} (+ table.md, table.csv, comparison.png)")
    best = summary["best"]
    if best and best["mean_auc"] is not None:
        print(f"best: {best['run']} ({best['stage']}) mean test AUC {best['mean_auc']:.4f}")
    for name, why in summary["failed"].items():
        where = run_dir(args.out, name) if name in {s.name for s in sweep.runs} else Path(args.out) / "ensembles" / name
        print(f"error: {where}: failed ({why})", file=sys.stderr)
    return 2 if summary["failed"] else 0
