"""``cxrflow explore``: dataset statistics and figures from a collection's metadata (:mod:`cxrflow.data.explore`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cxrflow.commands.common import must_exist
from cxrflow.data.formats import add_format_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data", type=Path, help="collection folder (NIH release, CheXpert, MIMIC-CXR-JPG, labels.csv)"
    )
    source.add_argument("--metadata", type=Path, help="a Data_Entry_2017[_v2020].csv file")
    parser.add_argument("--out", required=True, type=Path, help="folder for stats.json, figures and summary.md")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    add_format_arguments(parser)


def run(args: argparse.Namespace) -> int:
    must_exist([args.data], "not a folder (expected a chest X-ray collection folder)")
    from cxrflow.data.explore import FIGURES, STATS_NAME, SUMMARY_NAME, _age_text, explore
    from cxrflow.data.formats import load_collection, say_left_out
    from cxrflow.data.labels import NIH14
    from cxrflow.data.metadata import read_data_entry

    started = time.perf_counter()
    if args.data is not None:
        collection = load_collection(args.data, args.format, views=args.views, need_images=False)
        entries, source, vocab = collection.entries, collection.metadata_path, collection.vocab
        states, notes = collection.states, collection.notes
    else:
        entries, source, vocab, states, notes = read_data_entry(args.metadata), args.metadata, NIH14, None, []
    stats = explore(entries, args.out, str(source), vocab, overwrite=args.overwrite, states=states, notes=notes)
    say_left_out(notes)
    top = max((k for k in stats["cooccurrence"]), key=lambda k: stats["findings"][k])
    rare = min((k for k in stats["cooccurrence"]), key=lambda k: stats["findings"][k])
    print(
        f"{stats['images']:,} images, {stats['patients']:,} patients "
        f"({stats['patients_by_sex']['M']:,} M, {stats['patients_by_sex']['F']:,} F), "
        f"ages {_age_text(stats['age'])}, "
        f"up to {stats['images_per_patient']['max']} images per patient"
    )
    print(f"most frequent finding: {top} ({stats['findings'][top]:,}); rarest: {rare} ({stats['findings'][rare]:,})")
    seconds = time.perf_counter() - started
    print(f"wrote {STATS_NAME}, {len(FIGURES)} figures and {SUMMARY_NAME} to {args.out} in {seconds:.1f} s")
    return 0
