"""Peak memory of ``cxrflow evaluate`` at 512 px is flat in the split's size.

Builds two synthetic stores at 512 px whose test splits hold N and 4N images (validation, scored
for the thresholds, is the same size in both), a ``simple_cnn`` checkpoint with random weights for
each (evaluation's memory does not depend on what the weights learned), and runs ``cxrflow
evaluate`` on each in a fresh process, reading that process's peak RSS (``ru_maxrss``). Target:
peak(4N) <= 1.1 * peak(N) + 50 MB. For scale it prints the pixels the test split holds (what an
evaluation that kept every batch alive would add). N is at least two of the ETL's row groups at
512 px (256 rows each), so the loader's bounded read-ahead has its steady size already at N; a
smaller N measures the row-group size, not growth. At the default N = 512 it takes a few minutes
on 2 quiet cores.

    python benchmarks/evaluate.py [--images 512] [--val 32] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZE = 512

CHILD = """
import resource, sys, time
from cxrflow.cli import main
start = time.perf_counter()
rc = main(sys.argv[1:])
print("RESULT", rc, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.perf_counter() - start)
"""


def make_run(root: Path, test_images: int, val_images: int) -> Path:
    """A store with ``test_images`` test rows at 512 px and a run folder holding a random simple_cnn."""
    import torch

    from cxrflow.data.store import pixel_stats, read_manifest, store_identity
    from cxrflow.modelling.models import create_model
    from cxrflow.modelling.train import save_checkpoint
    from cxrflow.testing.synthstore import write_synthetic_store

    store, run = root / "store", root / "run"
    manifest = write_synthetic_store(store, sizes=(SIZE,), rows={"train": 32, "val": val_images, "test": test_images},
                                     rows_per_file=512, row_group_rows=None, seed=len(str(root)))  # fmt: skip
    torch.manual_seed(0)
    model = create_model("simple_cnn", len(manifest["label_names"]), pretrained="none")
    mean, std = pixel_stats(read_manifest(store), SIZE)
    config = {"store": str(store), "size": SIZE, "model": "simple_cnn", "pixel_mean": mean, "pixel_std": std,
              "label_names": manifest["label_names"], "store_identity": store_identity(store, manifest, SIZE)}  # fmt: skip
    run.mkdir(parents=True)
    save_checkpoint(run / "best_finetune.pt", {"model": model.state_dict(), "stage": "finetune", "epoch": 1,
                                               "config": config, "label_names": manifest["label_names"]})  # fmt: skip
    return run


def measure(run: Path, args) -> dict:
    cmd = [sys.executable, "-c", CHILD, "evaluate", "--run", str(run), "--n-boot", str(args.n_boot),
           "--device", "cpu", "--batch-size", str(args.batch_size), "--out", str(run / "eval")]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((s for s in out.stdout.splitlines() if s.startswith("RESULT ")), None)
    if out.returncode or line is None or line.split()[1] != "0":
        sys.exit(f"evaluate failed:\n{out.stdout}\n{out.stderr}")
    _, _, peak, seconds = line.split()
    return {"peak": int(peak), "seconds": float(seconds)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512, help="N: test images of the smaller store (the other has 4N)")
    p.add_argument("--val", type=int, default=32, help="validation images of both stores")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (activations dominate the peak)")
    p.add_argument("--n-boot", type=int, default=100)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    own = args.workdir is None
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cxrflow-bench-evaluate-"))
    try:
        print(
            f"cxrflow evaluate memory benchmark: {SIZE} px, N = {args.images}, val {args.val}, batch {args.batch_size}, "
            f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        results = {}
        for n in (args.images, 4 * args.images):
            t = time.perf_counter()
            run = make_run(work / f"n{n}", n, args.val)
            print(f"built store and run with {n} test images ({time.perf_counter() - t:.0f} s)", flush=True)
            results[n] = measure(run, args)
            r = results[n]
            print(
                f"  evaluate on {n:>5} test images: peak RSS {r['peak'] / 2**20:7.0f} MB, {r['seconds']:.0f} s "
                f"(the split's pixels: {n * SIZE * SIZE / 2**20:.0f} MB)",
                flush=True,
            )
        small, large = results[args.images]["peak"], results[4 * args.images]["peak"]
        limit = 1.1 * small + 50 * 2**20
        print(
            f"peak(4N) / peak(N) = {large / small:.3f}; peak(4N) - peak(N) = {(large - small) / 2**20:+.0f} MB; "
            f"target peak(4N) <= 1.1 peak(N) + 50 MB = {limit / 2**20:.0f} MB: {'met' if large <= limit else 'NOT met'}"
        )
        print(json.dumps({str(k): v for k, v in results.items()}))
        print(
            f"load average at end {os.getloadavg()[0]:.1f} (other jobs on this machine slow the timings, not the memory)"
        )
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
