"""``cxrflow demo``: every stage on a synthetic dataset (:mod:`cxrflow.demo`)."""

from __future__ import annotations

import argparse
import sys

from cxrflow import options
from cxrflow.errors import CxrflowError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for everything the demo writes")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    parser.add_argument(
        "--patients", type=int, default=300, help="synthetic patients (default: 300, about 1,100 images)"
    )
    parser.add_argument(
        "--epochs", type=int, default=2, help="fine-tuning epochs of densenet121 (default: 2; simple_cnn trains 2 more)"
    )
    parser.add_argument(
        "--seed", type=options.seed, default=0, help="seed of the data, split and training (default: 0)"
    )
    parser.add_argument("--master", default="local[2]", help="Spark master for the ETL (default: local[2])")


def run(args: argparse.Namespace) -> int:
    from cxrflow.data.synth import MAX_PATIENTS
    from cxrflow.demo import TARGET_AUC, format_summary, run_demo
    from cxrflow.modelling.config import MAX_EPOCHS

    if not 20 <= args.patients <= MAX_PATIENTS:
        raise CxrflowError(f"--patients must be between 20 and {MAX_PATIENTS:,}, got {args.patients}")
    if not 1 <= args.epochs < MAX_EPOCHS:  # simple_cnn trains one more
        raise CxrflowError(f"--epochs must be between 1 and {MAX_EPOCHS - 1:,}, got {args.epochs}")
    summary = run_demo(
        args.out,
        patients=args.patients,
        epochs=args.epochs,
        seed=args.seed,
        master=args.master,
        overwrite=args.overwrite,
    )
    print(format_summary(summary))
    if not summary["target_met"]:
        print(f"error: {summary['out']}: the best mean test AUC is below the target {TARGET_AUC}", file=sys.stderr)
        return 1
    return 0
