"""``cxrflow ensemble``: combine evaluated runs into an evaluated ensemble (:mod:`cxrflow.modelling.ensemble`)."""

from __future__ import annotations

import argparse

from cxrflow import options
from cxrflow.commands.common import add_audit_arguments, must_exist
from cxrflow.tracking import add_arguments as add_tracking_arguments
from cxrflow.tracking import log_ensemble, read_record, request_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "members",
        nargs="+",
        metavar="RUN_OR_EVAL",
        help="evaluation folders, or run folders (their default checkpoint's evaluation)",
    )
    parser.add_argument(
        "--out", required=True, help="the ensemble folder to write (an evaluation folder in its own right)"
    )
    parser.add_argument(
        "--method",
        default="mean",
        help="mean (of calibrated probabilities) or stacked (logistic regression on validation logits)",
    )
    parser.add_argument(
        "--split",
        default="test",
        choices=["val", "test"],
        help="the members' evaluated split, for run folders (default: test)",
    )
    parser.add_argument(
        "--n-boot", type=options.n_boot, default=1000, help="patient bootstrap resamples for the CIs (default: 1000)"
    )
    parser.add_argument("--seed", type=options.seed, default=0, help="bootstrap and stacking seed (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing ensemble folder")
    add_audit_arguments(parser)
    add_tracking_arguments(parser)  # the ensemble is its own MLflow run (ENS/mlflow.json)


def run(args: argparse.Namespace) -> int:
    must_exist(args.members, "no such run or evaluation folder")
    from cxrflow.modelling.ensemble import build_ensemble
    from cxrflow.modelling.scoring import format_summary
    from cxrflow.results.demographics_baseline import format_lines
    from cxrflow.results.subgroups import ensemble_audit, format_audit
    from cxrflow.runs import METRICS_NAME, PREDICTIONS_NAME, VAL_PREDICTIONS_NAME

    tracking = request_from_args(args)
    replaced = read_record(args.out) if args.overwrite else None  # a tracked ensemble stays tracked when rebuilt
    metrics = build_ensemble(
        args.members,
        args.out,
        method=args.method,
        split=args.split,
        n_boot=args.n_boot,
        seed=args.seed,
        overwrite=args.overwrite,
        audit=ensemble_audit(args.audit_fpr) if args.audit else None,
    )
    log_ensemble(tracking, metrics, replaced)
    lines = [*format_summary(metrics).splitlines(), *format_lines(metrics)]
    lines[0] = (
        f"{metrics['model']} of {', '.join(metrics['member_names'])} on {metrics['split']}: "
        f"{metrics['n_images']} images, {metrics['n_patients']} patients"
    )
    print("\n".join(lines))
    print(metrics.get("audit_note") or format_audit(metrics.get("audit")))
    print(
        f"wrote {metrics['out']}/ ({METRICS_NAME}, {PREDICTIONS_NAME}, {VAL_PREDICTIONS_NAME}, {', '.join(metrics['figures'])})"
    )
    return 0
