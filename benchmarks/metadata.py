"""Benchmark: parse a full-size Data_Entry_2017_v2020.csv (112,120 rows, 30,805 patients).

Generates the file in the release's exact format (synthetic values, real shape), then times
``cxrflow.data.metadata.read_data_entry`` (typed parse, validation, label encoding) beside a bare
``pandas.read_csv`` of the same file, and prints both with their ratio.

    .venv/bin/python benchmarks/metadata.py [--repeat 5] [--keep PATH]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxrflow.data.labels import NIH14
from cxrflow.data.metadata import read_data_entry
from cxrflow.data.synth import sample_entries, write_data_entry

IMAGES = 112_120
PATIENTS = 30_805


def write_full_size(path: Path, seed: int = 0) -> None:
    """A 112,120-row metadata file of 30,805 patients in the release's format."""
    entries, _, _ = sample_entries(PATIENTS, np.random.default_rng(seed), NIH14, images=IMAGES)
    write_data_entry(entries, path)


def best_of(fn, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="also keep the generated CSV at this path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "Data_Entry_2017_v2020.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        write_full_size(path)
        print(f"generated {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s")
        frame = read_data_entry(path)
        assert len(frame) == IMAGES and frame["patient_id"].nunique() == PATIENTS
        base_min, base_med = best_of(lambda: pd.read_csv(path), args.repeat)
        ours_min, ours_med = best_of(lambda: read_data_entry(path), args.repeat)
        print(f"baseline pandas.read_csv     : best {base_min:.3f} s, median {base_med:.3f} s")
        print(f"cxrflow read_data_entry      : best {ours_min:.3f} s, median {ours_med:.3f} s")
        print(f"ratio (ours / baseline, best): {ours_min / base_min:.2f}x  ({IMAGES / ours_min:,.0f} rows/s)")


if __name__ == "__main__":
    main()
