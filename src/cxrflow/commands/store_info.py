"""``cxrflow store-info``: a Parquet store's manifest, worded for people, optionally verified (:mod:`cxrflow.data.store`)."""

from __future__ import annotations

import argparse
import json
import sys

from cxrflow.errors import CxrflowError
from cxrflow.names import printable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="store folder written by 'cxrflow etl'")
    parser.add_argument("--json", action="store_true", help="print the raw manifest as JSON")
    parser.add_argument(
        "--verify", action="store_true", help="read every part's footer and check rows and columns against the manifest"
    )


def run(args: argparse.Namespace) -> int:
    from cxrflow.data.manifest import read_manifest
    from cxrflow.outputs import leftovers, read_marker

    manifest = read_manifest(args.store)
    from cxrflow.data.store import format_manifest, verify_store  # pyarrow: after the store is found

    print(json.dumps(manifest, indent=2) if args.json else format_manifest(manifest))
    for folder in leftovers(args.store):
        fate = (f"the next 'cxrflow etl --out {args.store}' removes it" if read_marker(folder, "etl") is not None
                else "it carries no cxrflow etl marker, so cxrflow leaves it to you")  # fmt: skip
        print(printable(f"leftover of a killed run: {folder} ({fate})"), file=sys.stderr)
    if args.verify:
        problems, files, rows = verify_store(args.store, manifest)
        for problem in problems:
            print(printable(f"verify: {problem}"), file=sys.stderr)
        if problems:
            raise CxrflowError(f"store verification failed: {len(problems)} problem(s) (listed above)", args.store)
        print(f"verify: OK, {files} files, {rows} rows, as the manifest says")
    return 0
