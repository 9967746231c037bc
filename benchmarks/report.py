"""Benchmark: build report.html for the paper's study (5 runs, 9 evaluations, plus an ensemble).

Writes a synthetic study in the exact file shapes (store at 256 px, run and evaluation folders with
real figures, calibration, a localization folder, an ensemble), then times, in the same run:

- baseline: reading every evaluation's ``predictions.parquet`` (the bare cost of touching the results);
- ``build_html`` with the default cases (the best evaluation: 14 findings x 3 kinds x 3 images,
  read from the store in one pass);
- ``build_html`` with cases for every evaluation (ten passes over the store's test split).

and prints each beside the baseline, with the page's size.

    .venv/bin/python benchmarks/report.py [--test-rows 2000] [--repeat 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from cxrflow.results.htmlreport import build_html
from cxrflow.testing.synthstudy import write_study


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-rows", type=int, default=2000, help="test images per evaluation (default: 2000)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="write the study and the pages here instead of a temp folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        t = time.perf_counter()
        study = write_study(root / "study", test_rows=args.test_rows, store_size=256, draw_each=True)
        paths = [*study["runs"], study["ensemble"]]
        preds = [*study["evaluations"], study["ensemble"]]
        print(f"study: {len(study['runs'])} runs, {len(preds)} evaluations of {args.test_rows} test images, "
              f"written in {time.perf_counter() - t:.1f} s")  # fmt: skip

        def read_predictions():
            return [pq.read_table(p / "predictions.parquet").to_pandas() for p in preds]

        base, _ = best_of(read_predictions, args.repeat)
        best_cases, page = best_of(lambda: build_html(paths), args.repeat)
        all_cases, page_all = best_of(lambda: build_html(paths, cases_for="all"), args.repeat)
        (root / "report.html").write_text(page)
        (root / "report-all-cases.html").write_text(page_all)
        size, size_all = len(page.encode()), len(page_all.encode())
        print(f"baseline: read {len(preds)} predictions.parquet  : {base:.3f} s")
        print(
            f"report.html, cases of the best evaluation : {best_cases:.3f} s ({best_cases / base:.0f}x baseline), {size / 1e6:.2f} MB"
        )
        print(
            f"report.html, cases of all {len(preds)} evaluations : {all_cases:.3f} s ({all_cases / base:.0f}x baseline), {size_all / 1e6:.2f} MB"
        )


if __name__ == "__main__":
    main()
