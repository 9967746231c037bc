"""Benchmark: how long a person waits for ``--help`` and for a mistyped option.

Times, in fresh interpreters (best of N), ``python -c "import torch"`` as the baseline and then
cxrflow commands that must answer before torch, torchvision, scikit-learn or pyspark are imported:
the top-level help, a subcommand's help, and training pointed at a store that does not exist or
given an unknown model. Prints each with its ratio to the baseline (the goal: at most 0.2) and
whether the command imported any of those libraries.

    .venv/bin/python benchmarks/startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "torchvision", "sklearn", "pyspark")
GOAL = 0.2


def cases(tmp: Path) -> dict[str, list[str]]:
    """Name -> cxrflow arguments."""
    train = ["train", "--size", "32", "--model", "simple_cnn", "--out", str(tmp / "run")]
    return {
        "cxrflow --help": ["--help"],
        "cxrflow train --help": ["train", "--help"],
        "cxrflow evaluate --help": ["evaluate", "--help"],
        "cxrflow predict --help": ["predict", "--help"],
        "cxrflow train --store /nonexistent": [*train, "--store", str(tmp / "nonexistent")],
        "cxrflow train --model vgg": [
            "train",
            "--store",
            str(tmp),
            "--size",
            "32",
            "--model",
            "vgg",
            "--out",
            str(tmp / "r"),
        ],
        "cxrflow train --device gpu": [*train, "--store", str(tmp), "--device", "gpu"],
        "cxrflow store-info /nonexistent": ["store-info", str(tmp / "nonexistent")],
    }


def _probe(argv: list[str]) -> str:
    return (
        "import sys\nfrom cxrflow.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
    )


def best_of(command: list[str], repeat: int) -> tuple[float, str]:
    """Fastest wall time of ``repeat`` fresh runs, and the last run's stderr."""
    times, err = [], ""
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, env=os.environ, check=False)
        times.append(time.perf_counter() - start)
        err = proc.stderr
    return min(times), err


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per command; the fastest counts (default 5)")
    args = parser.parse_args()
    base, _ = best_of([sys.executable, "-c", "import torch"], args.repeat)
    empty, _ = best_of([sys.executable, "-c", "pass"], args.repeat)
    baseline = 'python -c "import torch"'
    print(f"{baseline:<40} {base:7.3f} s  (baseline)")
    print(f"{'python -c pass':<40} {empty:7.3f} s  ratio {empty / base:.2f}")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in cases(Path(tmp)).items():
            seconds, err = best_of([sys.executable, "-c", _probe(argv)], args.repeat)
            heavy = next((line[6:] for line in err.splitlines() if line.startswith("HEAVY=")), "?")
            worst = max(worst, seconds / base)
            print(f"{name:<40} {seconds:7.3f} s  ratio {seconds / base:.2f}  heavy imports: {heavy or 'none'}")
    print(f"worst ratio {worst:.2f} (goal <= {GOAL})")
    return 0 if worst <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
