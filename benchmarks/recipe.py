"""The default recipe against ``--preset paper`` at two amounts of data, same data, same seed.

For each ``--images`` count: a synthetic release of about that many images (``cxrflow synth
--demographic-findings``: three findings are faint on the image, so the task is not saturated --
on the plain synthetic release at 32 px both recipes reach a mean AUC of 0.99-1.0), the Spark ETL
at ``--size``, then for each model one run per recipe: ``--preset paper``, the default preset, and
the default with ``augment=true`` (the affine jitter it had before; what it costs is the reason the
default has none), all from random weights (the comparison is about the schedule, and ImageNet
weights need a download), each evaluated on the test split. Prints mean test AUC with its 95%
patient-bootstrap interval, epochs and optimiser steps of each, and default - paper.
Finished runs and evaluations in ``--work`` are reused, so an interrupted benchmark continues.

    python benchmarks/recipe.py --images 1000 10000 --models simple_cnn densenet121 --size 32 --work /tmp/recipe
    python benchmarks/recipe.py --images 3000 --models simple_cnn --size 64 --work /tmp/recipe
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


#: What is compared: name -> (preset, overrides). "default+augment" is the default with the affine
#: augmentation the default used to have (rotation 7 deg, zoom 10%, shift 5%), to show what it costs.
RECIPES = {"paper": ("paper", {}), "default": ("default", {}), "default+augment": ("default", {"augment": True})}


def one(store: Path, work: Path, model: str, recipe: str, size: int, seed: int, device: str) -> dict:
    """Train (or reuse) and evaluate (or reuse) one run; returns its figures."""
    from cxrflow.modelling.config import resolve_config
    from cxrflow.modelling.train import train
    from cxrflow.results.evaluate import evaluate_run

    preset, overrides = RECIPES[recipe]
    run = work / f"{model}-{recipe}"
    started = time.perf_counter()
    if not (run / "done.json").exists():
        config = resolve_config(
            preset,
            None,
            {
                "store": str(store),
                "size": size,
                "model": model,
                "out": str(run),
                "pretrained": "none",
                "seed": seed,
                "device": device,
                **overrides,
            },
        )
        train(config, resume=run.exists(), quiet=True, log=lambda _: None)
    minutes = (time.perf_counter() - started) / 60
    evals = sorted(run.glob("eval-test-best_finetune/metrics.json"))
    metrics = json.loads(evals[0].read_text()) if evals else evaluate_run(run, n_boot=500, device=device)
    return {
        "model": model,
        "recipe": recipe,
        "mean_auc": metrics["mean_auc"],
        "ci": metrics["mean_auc_ci95"],
        "steps": _steps(run),
        "epochs": len((run / "metrics.jsonl").read_text().splitlines()),
        "train_minutes_this_session": round(minutes, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", type=int, default=[1000, 10000])
    parser.add_argument("--models", nargs="+", default=["simple_cnn", "densenet121"])
    parser.add_argument("--size", type=int, default=32, help="training size (small, for CPUs)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", required=True, help="folder for data, stores and runs (reused)")
    args = parser.parse_args()

    import torch

    from cxrflow.data.etl import run_etl
    from cxrflow.data.synth import synthesize

    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for n in args.images:
        base = Path(args.work) / f"n{n}-{args.size}px"
        if not (base / "store" / "_manifest.json").exists():
            synthesize(
                base / "data",
                patients=max(2, math.ceil(n / 3.6)),
                size=2 * args.size,
                seed=args.seed,
                overwrite=True,
                demographic_findings=True,
            )
            run_etl(base / "data", base / "store", [args.size], master="local[2]", overwrite=True)
        rows = json.loads((base / "store" / "_manifest.json").read_text())["rows"][str(args.size)]
        for model in args.models:
            cells = {r: one(base / "store", base, model, r, args.size, args.seed, args.device) for r in args.recipes}
            for r in cells.values():
                r.update(images=sum(rows.values()), train_images=rows["train"], size=args.size)
                results.append(r)
            shown = "  ".join(
                f"{name} {c['mean_auc']:.4f} ({c['ci'][0]:.3f}-{c['ci'][1]:.3f}, {c['epochs']} epochs, {c['steps']} steps)"
                for name, c in cells.items()
            )
            versus = (
                f"  default - paper {cells['default']['mean_auc'] - cells['paper']['mean_auc']:+.4f}"
                if {"default", "paper"} <= cells.keys()
                else ""
            )
            print(
                f"{sum(rows.values()):>6} images ({rows['train']} train) {args.size} px {model:<12} {shown}{versus}",
                flush=True,
            )
    (Path(args.work) / f"results-{args.size}px.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
