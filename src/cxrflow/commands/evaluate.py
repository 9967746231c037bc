"""``cxrflow evaluate``: per-finding test AUC with confidence intervals and figures (:mod:`cxrflow.results.evaluate`)."""

from __future__ import annotations

import argparse

from cxrflow import options
from cxrflow.commands.common import add_audit_arguments, checked_device, must_exist
from cxrflow.errors import CxrflowError
from cxrflow.names import printable
from cxrflow.tracking import add_arguments as add_tracking_arguments
from cxrflow.tracking import log_evaluation, request_from_args


def _uncertain_policy(text: str) -> str:
    """argparse type of ``--uncertain`` (numpy is imported only when the option is given)."""
    from cxrflow.data.uncertain import check_policy

    return check_policy(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder written by 'cxrflow train'")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="best_finetune, best_kt, last or a .pt path (default: best_finetune if present, else best_kt)",
    )
    parser.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test", "all"],
        help="split to evaluate (default: test); all: every split of another collection's --store",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: RUN/eval-<split>-<checkpoint>, RUN/eval-<store>-<split>-<checkpoint> "
        "on another collection's store)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing evaluation folder")
    parser.add_argument(
        "--n-boot", type=options.n_boot, default=1000, help="patient bootstrap resamples for the CIs (default: 1000)"
    )
    parser.add_argument("--seed", type=options.seed, default=0, help="bootstrap seed (default: 0)")
    options.add_device(parser, checked_by_parser=False)
    options.add_batch_size(parser, 64)
    parser.add_argument(
        "--store",
        default=None,
        help="store folder: the run's own when it moved since training (it holds the run's splits), or another "
        "collection's store (docs/cross-collection.md; default: the run's)",
    )
    parser.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="MODEL_FINDING=STORE_FINDING",
        help="score the model's finding against the store's finding of another name (repeatable; "
        "docs/cross-collection.md)",
    )
    parser.add_argument(
        "--uncertain",
        type=_uncertain_policy,
        default="ignore",
        help="another collection's uncertain labels: ignore (masked, default), ones or zeros",
    )
    add_audit_arguments(parser)
    add_tracking_arguments(parser)  # a tracked run (RUN/mlflow.json) is logged to also without --mlflow


def run(args: argparse.Namespace) -> int:
    checked_device(args.device)
    must_exist([args.run], "no such run folder")
    from cxrflow.results.crosseval import evaluate_on_store, is_other_collection
    from cxrflow.results.evaluate import evaluate_run
    from cxrflow.results.multieval import evaluate_on_trained_stores, trained_stores
    from cxrflow.runs import resolve_checkpoint

    tracking = request_from_args(args)
    if args.store is None and trained_stores(args.run):  # a run on several stores: one evaluation each
        for metrics in evaluate_on_trained_stores(
            args.run, checkpoint=args.checkpoint, split=args.split, out=args.out, uncertain=args.uncertain,
            n_boot=args.n_boot, seed=args.seed, device=args.device, batch_size=args.batch_size,
            overwrite=args.overwrite, audit=args.audit, audit_fpr=args.audit_fpr,
        ):  # fmt: skip
            _show(metrics, tracking)
        return 0
    if args.store is not None and (
        args.map or is_other_collection(resolve_checkpoint(args.run, args.checkpoint)[1], args.store)
    ):
        metrics = evaluate_on_store(
            args.run, args.store, checkpoint=args.checkpoint, split=args.split, out=args.out, maps=tuple(args.map),
            uncertain=args.uncertain, n_boot=args.n_boot, seed=args.seed, device=args.device,
            batch_size=args.batch_size, overwrite=args.overwrite, audit=args.audit, audit_fpr=args.audit_fpr,
        )  # fmt: skip
    elif args.split == "all":
        raise CxrflowError("--split all scores every split of another collection's store (give it with --store)")
    else:
        metrics = _evaluate(args, evaluate_run)
    _show(metrics, tracking)
    return 0


def _show(metrics: dict, tracking) -> None:
    """Log one evaluation to the tracking server (if any) and print its summary."""
    from cxrflow.modelling.scoring import format_summary
    from cxrflow.results.crosseval import format_cross_lines
    from cxrflow.results.demographics_baseline import format_lines
    from cxrflow.results.subgroups import format_audit
    from cxrflow.runs import METRICS_NAME, PREDICTIONS_NAME, VAL_PREDICTIONS_NAME

    log_evaluation(tracking, metrics)
    print("\n".join([format_summary(metrics), *format_lines(metrics), *format_cross_lines(metrics)]))
    if "audit" in metrics:
        print(format_audit(metrics["audit"]))
    print(
        printable(
            f"wrote {metrics['out']}/ ({METRICS_NAME}, {PREDICTIONS_NAME}, {VAL_PREDICTIONS_NAME}, "
            f"{', '.join(metrics['figures'])})"
        )
    )


def _evaluate(args: argparse.Namespace, evaluate_run) -> dict:
    """The run's own evaluation (its store, or that store moved)."""
    return evaluate_run(
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
        audit=args.audit,
        audit_fpr=args.audit_fpr,
    )
