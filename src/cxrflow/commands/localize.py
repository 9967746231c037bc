"""``cxrflow localize``: heatmaps against ground-truth boxes, the ChestX-ray14 localization benchmark (:mod:`cxrflow.results.localize`)."""

from __future__ import annotations

import argparse
import sys

from cxrflow import options
from cxrflow.commands.common import checked_device, must_exist
from cxrflow.data.boxes import MAX_BOXES
from cxrflow.names import printable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder written by 'cxrflow train'")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="best_finetune, best_kt, last or a .pt path (default: best_finetune, else best_kt)",
    )
    parser.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="split whose boxes are scored (default: test)"
    )
    parser.add_argument(
        "--method",
        default=None,
        choices=["gradcam", "hirescam"],
        help="heatmap method (default: the model's faithful one)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: RUN/localize-<split>-<checkpoint>)")
    parser.add_argument("--bbox", default=None, help="a BBox_List_2017.csv to use instead of the store's box file")
    parser.add_argument("--store", default=None, help="store folder, when it moved since training (default: the run's)")
    options.add_device(parser, checked_by_parser=False)
    options.add_batch_size(parser, 16, "images per heatmap batch")
    parser.add_argument(
        "--max-boxes",
        type=int,
        default=MAX_BOXES,
        help=f"predicted boxes kept per image and finding (default: {MAX_BOXES})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing localization folder")


def run(args: argparse.Namespace) -> int:
    checked_device(args.device)
    must_exist([args.run], "no such run folder")
    import pandas as pd

    from cxrflow.results.localize import BOXES_CSV, JSON_NAME, format_table, localize_run

    result = localize_run(
        args.run, checkpoint=args.checkpoint, split=args.split, method=args.method, out=args.out, bbox=args.bbox,
        store=args.store, device=args.device, batch_size=args.batch_size, max_boxes=args.max_boxes,
        overwrite=args.overwrite,
    )  # fmt: skip
    print(format_table(result))
    if result["findings_without_boxes"]:
        print(
            printable(
                f"no boxes in the {result['split']} split for: {', '.join(result['findings_without_boxes'])} "
                "(accuracy n/a)"
            )
        )
    if result["unscored"]:
        reasons = pd.Series([u["kind"] for u in result["unscored"]]).value_counts()
        print(
            f"{len(result['unscored'])} boxes not scored ("
            + "; ".join(f"{k}: {v}" for k, v in reasons.items())
            + f"), listed in {JSON_NAME}",
            file=sys.stderr,
        )
    print(printable(f"wrote {result['out']}/ ({JSON_NAME}, {BOXES_CSV}, {', '.join(result['figures'])})"))
    return 0
