"""The default recipe against ``--preset paper`` at two amounts of data, same data, same seed.

For each ``--images`` count: a synthetic release of about that many images (``cxrflow synth
--demographic-findings``: three findings are faint on the image, so the task is not saturated --
on the plain synthetic release at 32 px both recipes reach a mean AUC of 0.99-1.0), the Spark ETL
at ``--size``, then for each model one run with ``--preset paper`` and one with the
default preset (both from random weights: the comparison is about the schedule, and ImageNet
weights need a download), each evaluated on the test split. Prints mean test AUC with its 95%
patient-bootstrap interval, the difference, optimiser steps and training minutes of each.
Finished runs and evaluations in ``--work`` are reused, so an interrupted benchmark continues.

    python benchmarks/recipe.py --images 1000 10000 --models simple_cnn densenet121 --size 32 --work /tmp/recipe
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path


def _steps(run: Path) -> int:
    """Optimiser steps the run took (train images per epoch / batch size, summed over epochs)."""
    config = json.loads((run / "config.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return sum(r["train_images"] // config["batch_size"] for r in rows)


def one(store: Path, work: Path, model: str, preset: str, size: int, seed: int, device: str) -> dict:
    """Train (or reuse) and evaluate (or reuse) one run; returns its figures."""
    from cxrflow.config import resolve_config
    from cxrflow.evaluate import evaluate_run
    from cxrflow.train import train

    run = work / f"{model}-{preset}"
    started = time.perf_counter()
    if not (run / "done.json").exists():
        config = resolve_config(preset, None, {
            "store": str(store), "size": size, "model": model, "out": str(run), "pretrained": "none",
            "seed": seed, "device": device,
        })
        train(config, resume=run.exists(), quiet=True, log=lambda _: None)
    minutes = (time.perf_counter() - started) / 60
    evals = sorted(run.glob("eval-test-best_finetune/metrics.json"))
    metrics = json.loads(evals[0].read_text()) if evals else evaluate_run(run, n_boot=500, device=device)
    return {"model": model, "preset": preset, "mean_auc": metrics["mean_auc"], "ci": metrics["mean_auc_ci95"],
            "steps": _steps(run), "epochs": len((run / "metrics.jsonl").read_text().splitlines()),
            "train_minutes_this_session": round(minutes, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", type=int, default=[1000, 10000])
    parser.add_argument("--models", nargs="+", default=["simple_cnn", "densenet121"])
    parser.add_argument("--size", type=int, default=32, help="training size (small, for CPUs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", required=True, help="folder for data, stores and runs (reused)")
    args = parser.parse_args()

    import torch

    from cxrflow.etl import run_etl
    from cxrflow.synth import synthesize

    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for n in args.images:
        base = Path(args.work) / f"n{n}"
        if not (base / "store" / "_manifest.json").exists():
            synthesize(base / "data", patients=max(2, math.ceil(n / 3.6)), size=2 * args.size, seed=args.seed,
                       overwrite=True, demographic_findings=True)
            run_etl(base / "data", base / "store", [args.size], master="local[2]", overwrite=True)
        rows = json.loads((base / "store" / "_manifest.json").read_text())["rows"][str(args.size)]
        for model in args.models:
            pair = [one(base / "store", base, model, p, args.size, args.seed, args.device) for p in ("paper", "default")]
            for r in pair:
                r.update(images=sum(rows.values()), train_images=rows["train"])
                results.append(r)
            paper, default = pair
            print(
                f"{sum(rows.values()):>6} images ({rows['train']} train) {model:<12} "
                f"paper {paper['mean_auc']:.4f} ({paper['ci'][0]:.3f}-{paper['ci'][1]:.3f}, {paper['steps']} steps) "
                f"default {default['mean_auc']:.4f} ({default['ci'][0]:.3f}-{default['ci'][1]:.3f}, "
                f"{default['steps']} steps)  default - paper {default['mean_auc'] - paper['mean_auc']:+.4f}",
                flush=True,
            )
    (Path(args.work) / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
