"""``cxrflow synth``: write a synthetic dataset in the NIH ChestX-ray14 release format (:mod:`cxrflow.data.synth`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cxrflow import options
from cxrflow.data.synth import DEMOGRAPHIC_FINDINGS, PLACEMENTS, synthesize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="folder to write the dataset into")
    parser.add_argument("--patients", type=int, default=200, help="number of patients (default 200, ~3.6 images each)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024, like the release)")
    parser.add_argument("--seed", type=options.seed, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier synthetic dataset at --out")
    parser.add_argument(
        "--placement", default="grid", choices=PLACEMENTS, help="findings in their own grid cell (default) or anywhere"
    )
    parser.add_argument(
        "--demographic-findings",
        action="store_true",
        help=f"{', '.join(DEMOGRAPHIC_FINDINGS)} follow age, sex and view and are faint on the image (for fusion)",
    )


def run(args: argparse.Namespace) -> int:
    s = synthesize(
        args.out,
        patients=args.patients,
        size=args.size,
        seed=args.seed,
        overwrite=args.overwrite,
        placement=args.placement,
        demographic_findings=args.demographic_findings,
    )
    print(
        f"wrote {s['images']} images of {s['patients']} patients ({s['size']}x{s['size']} px) to {s['out']} "
        f"in {s['seconds']:.1f} s"
    )
    print(
        f"  train_val_list: {s['train_val_images']} images, test_list: {s['test_images']} images "
        f"({s['test_patients']} patients); {s['boxes']} boxes; No Finding: {s['no_finding']}"
    )
    print("  findings: " + ", ".join(f"{k} {v}" for k, v in sorted(s["findings"].items(), key=lambda kv: -kv[1])))
    return 0
