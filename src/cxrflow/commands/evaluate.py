"""``cxrflow evaluate``: per-finding test AUC with confidence intervals and figures (:mod:`cxrflow.results.evaluate`)."""

from __future__ import annotations

import argparse

from cxrflow import options
from cxrflow.commands.common import checked_device, must_exist
from cxrflow.tracking import add_arguments as add_tracking_arguments
from cxrflow.tracking import log_evaluation, request_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder written by 'cxrflow train'")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="best_finetune, best_kt, last or a .pt path (default: best_finetune if present, else best_kt)",
    )
    parser.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to evaluate (default: test)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/eval-<split>-<checkpoint>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing evaluation folder")
    parser.add_argument("--n-boot", type=options.n_boot, default=1000, help="patient bootstrap resamples for the CIs (default: 1000)")
    parser.add_argument("--seed", type=options.seed, default=0, help="bootstrap seed (default: 0)")
    options.add_device(parser, checked_by_parser=False)
    options.add_batch_size(parser, 64)
    parser.add_argument("--store", default=None, help="store folder, when it moved since training (default: the run's); it must hold the run's splits")
    add_tracking_arguments(parser)  # a tracked run (RUN/mlflow.json) is logged to also without --mlflow


def run(args: argparse.Namespace) -> int:
    checked_device(args.device)
    must_exist([args.run], "no such run folder")
    from cxrflow.modelling.scoring import format_summary
    from cxrflow.results.demographics_baseline import format_lines
    from cxrflow.results.evaluate import evaluate_run
    from cxrflow.runs import METRICS_NAME, PREDICTIONS_NAME, VAL_PREDICTIONS_NAME

    tracking = request_from_args(args)
    metrics = evaluate_run(
        args.run,
        checkpoint=args.checkpoint,
        split=args.split,
        out=args.out,
        n_boot=args.n_boot,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
        store=args.store,
        overwrite=args.overwrite,
    )
    log_evaluation(tracking, metrics)
    print("\n".join([format_summary(metrics), *format_lines(metrics)]))
    print(f"wrote {metrics['out']}/ ({METRICS_NAME}, {PREDICTIONS_NAME}, {VAL_PREDICTIONS_NAME}, {', '.join(metrics['figures'])})")
    return 0
