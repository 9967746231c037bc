"""``cxrflow split``: the patient-level train/val/test split as CSV (:mod:`cxrflow.data.split`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cxrflow import options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, type=Path, help="release folder (Data_Entry CSV, optional split lists)"
    )
    parser.add_argument("--out", required=True, type=Path, help="CSV to write: image_id,patient_id,split")
    options.add_val_fraction(parser)
    parser.add_argument("--seed", type=options.seed, default=0, help="random seed of the patient shuffle (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    from cxrflow.data.formats import add_format_arguments

    add_format_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from cxrflow.data.formats import load_collection, say_left_out
    from cxrflow.data.split import MODE_OFFICIAL, assign_collection_splits, split_counts, write_split_csv

    collection = load_collection(args.data, args.format, views=args.views, need_images=False)
    frame = assign_collection_splits(collection, args.val_fraction, args.seed)
    write_split_csv(frame, args.out, overwrite=args.overwrite)
    if frame.attrs["mode"] == "official-split":
        print("mode: the collection's own train/val/test split")
    elif frame.attrs["mode"] == MODE_OFFICIAL and collection.format != "nih":
        print(
            f"mode: the collection's official test split; its other patients split "
            f"{1 - args.val_fraction:.0%}/{args.val_fraction:.0%} train/val, seed {args.seed}"
        )
    elif frame.attrs["mode"] == MODE_OFFICIAL:
        print(
            f"mode: official lists (test = test_list.txt; train_val_list.txt patients split "
            f"{1 - args.val_fraction:.0%}/{args.val_fraction:.0%} train/val, seed {args.seed})"
        )
    else:
        print(
            "mode: no official split in the data folder: all patients split "
            f"70/10/20 train/val/test (seed {args.seed}; --val-fraction is not used)"
        )
    for name, c in split_counts(frame).items():
        print(f"  {name:5s} {c['images']:7d} images  {c['patients']:6d} patients")
    print(f"wrote {len(frame)} rows to {args.out}")
    say_left_out(collection.notes)
    return 0
