"""``cxrflow predict``: finding probabilities for new image files (:mod:`cxrflow.results.predict`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrflow import options
from cxrflow.commands.common import checked_device, must_exist
from cxrflow.errors import CxrflowError
from cxrflow.names import printable

if TYPE_CHECKING:
    from cxrflow.results.predict import Demographics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help="PNG, JPEG or DICOM files (any size, gray, RGB, RGBA or 16-bit); default: the images of --metadata",
    )
    parser.add_argument(
        "--run", default=None, help="run folder written by 'cxrflow train', or an ensemble folder ('cxrflow ensemble')"
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="best_finetune, best_kt, last or a .pt path (default: best_finetune, else best_kt)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="the model's raw sigmoid outputs instead of calibrated probabilities (and thresholds on that scale)",
    )
    options.add_device(parser, checked_by_parser=False)
    options.add_batch_size(parser, 32)
    parser.add_argument(
        "--store", default=None, help="the training store, only for checkpoints that lack pixel statistics"
    )
    parser.add_argument(
        "--heatmaps", default=None, metavar="DIR",
        help="write a heatmap overlay PNG per image and flagged finding into DIR (paths in the JSON output)",
    )  # fmt: skip
    parser.add_argument(
        "--heatmap-method", default=None, choices=["gradcam", "hirescam"], help="default: the model's own"
    )
    parser.add_argument("--age", default=None, help="patient age in years, for runs trained with --fusion demographics")
    parser.add_argument("--sex", default=None, help="M or F (or unknown), for fused runs")
    parser.add_argument("--view", default=None, help="view position PA or AP (or unknown), for fused runs")
    parser.add_argument(
        "--metadata",
        default=None,
        metavar="CSV",
        help="image,age,sex,view rows for many files (image as given, or its file name)",
    )
    from cxrflow.results.batchscore import add_batch_arguments

    add_batch_arguments(parser)


def demographics_from_args(args: argparse.Namespace) -> tuple[list[str], dict[str, Demographics] | None]:
    """The images to score and their demographics from --age/--sex/--view or --metadata (None: none given)."""
    from cxrflow.data.demographics import FIELDS, parse_age, parse_choice, read_metadata_csv

    flags = {f: getattr(args, f) for f in FIELDS}
    given = [f for f, v in flags.items() if v is not None]
    images = list(args.images)
    if args.metadata is not None:
        if given:
            raise CxrflowError(f"--metadata and --{given[0]} exclude each other; put the values in the CSV")
        table = read_metadata_csv(args.metadata)
        if not images:
            base = Path(args.metadata).parent
            images = [name if Path(name).is_absolute() else str(base / name) for name in table]
            table = dict(zip(images, table.values()))
        return images, table
    if not images:
        raise CxrflowError("give at least one IMAGE (or --metadata CSV)")
    if not given:
        return images, None
    if len(given) < len(FIELDS):
        missing = ", ".join(f"--{f}" for f in FIELDS if f not in given)
        raise CxrflowError(f"give --age, --sex and --view together (missing {missing}; 'unknown' is allowed)")
    entry = (
        parse_age(flags["age"]),
        parse_choice(flags["sex"], "sex", "--sex"),
        parse_choice(flags["view"], "view", "--view"),
    )
    return images, {str(image): entry for image in images}


def run(args: argparse.Namespace) -> int:
    if args.out is not None:
        return _run_batch(args)
    if args.run is None and args.checkpoint is None:
        raise CxrflowError("give --run RUN (or --checkpoint FILE.pt)")
    checked_device(args.device)
    must_exist([args.run], "no such run folder")
    from cxrflow.atomic import json_safe
    from cxrflow.results.predict import load_predictor, predict_files

    images, demographics = demographics_from_args(args)
    predictor = load_predictor(args.run, args.checkpoint, device=args.device, store=args.store, raw=args.raw)
    if demographics is not None and not predictor.uses_demographics:
        print("note: this run does not use demographics; --age/--sex/--view/--metadata are ignored", file=sys.stderr)
    predictions, errors = predict_files(
        predictor, images, batch_size=max(1, args.batch_size), demographics=demographics
    )
    heatmap_method = None
    if args.heatmaps is not None:
        from cxrflow.results.overlays import write_prediction_heatmaps

        heatmap_method = write_prediction_heatmaps(predictor, predictions, args.heatmaps, method=args.heatmap_method)
    if args.json:
        print(
            json.dumps(
                json_safe(
                    {
                        "checkpoint": str(predictor.checkpoint),
                        "size": predictor.size,
                        "calibrated": predictor.calibrated,
                        "label_names": predictor.label_names,
                        "thresholds": predictor.thresholds,
                        "predictions": predictions,
                        "errors": errors,
                        **({"heatmap_method": heatmap_method} if heatmap_method else {}),
                    }
                ),
                indent=2,
            )
        )
    elif predictions:
        print(format_calls(predictions, predictor.label_names, predictor.thresholds))
        if heatmap_method:
            print(f"wrote {sum(len(p['heatmaps']) for p in predictions)} {heatmap_method} heatmaps to {args.heatmaps}")
        if predictor.thresholds is None and not getattr(predictor, "note", None):  # a note says why itself
            print(f"note: {no_thresholds(args, predictor)}", file=sys.stderr)
    if getattr(predictor, "note", None):  # an ensemble checks its members when it loads
        print(f"note: {predictor.note}", file=sys.stderr)
    for e in errors:
        print(f"error: {printable(e['image'])}: {printable(e['error'])}", file=sys.stderr)
    return 2 if errors else 0


def format_calls(predictions: Sequence[dict], label_names: Sequence[str], thresholds: dict[str, float] | None) -> str:
    """One line per image: the file and one probability per finding. With thresholds (an evaluated
    run) each finding's heading carries the threshold that calls it (``Edema>=0.412``) and each line
    ends with the findings called; without, the headings are the finding names alone."""
    if not predictions:
        return ""
    names = [
        printable(n if thresholds is None or n not in thresholds else f"{n}>={thresholds[n]:.3f}") for n in label_names
    ]
    width = max(len("image"), *(len(printable(r["image"])) for r in predictions))
    cols = [max(len(n), 5) for n in names]
    header = f"{'image':<{width}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, cols))
    lines = [header + ("" if thresholds is None else "  positive at the validation threshold")]
    for r in predictions:
        p = r["probabilities"]
        line = f"{printable(r['image']):<{width}}  " + "  ".join(f"{p[n]:>{w}.3f}" for n, w in zip(label_names, cols))
        if thresholds is not None:
            line += "  " + printable(
                ", ".join(n for n in label_names if n in thresholds and p[n] >= thresholds[n]) or "none"
            )
        lines.append(line)
    return "\n".join(lines)


def no_thresholds(args: argparse.Namespace, predictor: Any) -> str:
    """Why no finding is called: the thresholds come from an evaluation of this checkpoint, and there is none to use."""
    if args.run is None:
        why = "a checkpoint file alone has no evaluation; give its run folder with --run"
    else:
        checkpoint = Path(predictor.checkpoint).stem
        why = (
            f"{args.run} has no evaluation of {checkpoint}; 'cxrflow evaluate --run {args.run} --checkpoint "
            f"{checkpoint}' chooses them on the validation split"
        )
    return (
        f"no finding is called: the thresholds that call a finding come from an evaluation of the checkpoint, "
        f"and {why}; the numbers above are {'calibrated ' if predictor.calibrated else ''}probabilities only"
    )


def _run_batch(args: argparse.Namespace) -> int:
    """``--out``: a whole store or collection scored as a Spark job (:mod:`cxrflow.results.batchscore`)."""
    if args.run is None:
        raise CxrflowError("give --run RUN: the run whose model scores the store")
    checked_device(args.device)
    must_exist([args.run], "no such run folder")
    from cxrflow.results.batchscore import run_batch
    from cxrflow.results.predict import load_predictor

    predictor = load_predictor(args.run, args.checkpoint, device=args.device, store=args.store, raw=args.raw)
    return run_batch(args, predictor)
