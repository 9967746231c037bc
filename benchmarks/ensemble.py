"""Calibration and ensembles on a synthetic store with faint findings: what they buy, measured.

Builds a store with cxrflow's planted-signal generator at a faint signal (so no model is near a
perfect AUC, and the store's ``pos_weight`` is that of a realistic prevalence), trains a few
different runs with cxrflow's own trainer, evaluates each (patient bootstrap, per-finding
temperature scaling fitted on validation) and combines them with ``cxrflow ensemble`` (mean and
stacked). Prints, per row: mean test AUC with its 95% interval, and mean ECE and Brier score of the
raw probabilities beside the calibrated ones. The baseline of each ensemble row is its best
member's mean AUC, shown as a difference. Also prints the ECE that a temperature alone (without
subtracting the ``log pos_weight`` shift first) would give, to show why the shift is removed.

    python benchmarks/ensemble.py                        # a few minutes on 2 CPU cores
    python benchmarks/ensemble.py --train 4000 --eval-rows 1000 --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=800, help="training images (default 800)")
    parser.add_argument("--eval-rows", type=int, default=400, help="validation and test images each (default 400)")
    parser.add_argument(
        "--signal", type=float, default=4.0, help="planted signal in gray levels, noise sd 25 (default 4)"
    )
    parser.add_argument("--prevalence", type=float, default=0.08, help="prevalence of each finding (default 0.08)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()

    from cxrflow.modelling.calibration import apply_temperatures, ece_and_brier, fit_temperatures
    from cxrflow.modelling.config import StageSettings, TrainConfig
    from cxrflow.modelling.ensemble import build_ensemble
    from cxrflow.modelling.train import train
    from cxrflow.results.evaluate import evaluate_run
    from cxrflow.runs import read_predictions
    from cxrflow.testing.synthstore import write_synthetic_store

    work = Path(args.out or tempfile.mkdtemp(prefix="cxrflow-ensemble-bench-"))
    store = work / "store"
    rows = {"train": args.train, "val": args.eval_rows, "test": args.eval_rows}
    write_synthetic_store(store, sizes=(32, 64), rows=rows, prevalence=args.prevalence, signal=args.signal)
    # three different runs: two seeds and learning rates at 32 px, and the other input size
    runs = {
        "simple_cnn-32-s0": dict(model="simple_cnn", size=32, seed=0, finetune=StageSettings(epochs=6, lr=3e-3)),
        "simple_cnn-32-s1": dict(model="simple_cnn", size=32, seed=1, finetune=StageSettings(epochs=4, lr=1e-2)),
        "simple_cnn-64": dict(model="simple_cnn", size=64, seed=2, finetune=StageSettings(epochs=5, lr=3e-3)),
    }
    evaluations = {}
    started = time.perf_counter()
    for name, settings in runs.items():
        config = TrainConfig(
            store=str(store), out=str(work / name), pretrained="none", batch_size=32,
            augment=False, device=args.device, early_stopping_patience=0, **settings,
        )  # fmt: skip
        train(config, quiet=True, log=lambda msg: None)
        evaluations[name] = evaluate_run(work / name, n_boot=args.n_boot, device=args.device, overwrite=True)
    ensembles = {}
    for method, members in (("stacked", list(runs)[:2]), ("stacked", list(runs)), ("mean", list(runs))):
        label = f"{method}: {' + '.join(members)}"
        ensembles[label] = build_ensemble(
            [work / m for m in members],
            work / f"ens-{method}-{len(members)}",
            method=method,
            n_boot=args.n_boot,
            overwrite=True,
        )
    seconds = time.perf_counter() - started

    print(f"store: {args.train}/{args.eval_rows}/{args.eval_rows} images at 32 and 64 px, signal {args.signal}, "
          f"prevalence {args.prevalence}; {seconds:.0f} s for training, evaluation and ensembles")  # fmt: skip
    head = f"{'row':<52} {'mean AUC':>8}  {'95% CI':<13} {'vs best':>8}  {'ECE raw':>8} {'ECE cal':>8} {'T only':>8}  {'Brier raw':>9} {'Brier cal':>9}"
    print(head)
    print("-" * len(head))
    for name, m in evaluations.items():
        # what temperature scaling alone (no log pos_weight shift) would have given
        val, _ = read_predictions(Path(m["out"]) / "val_predictions.parquet")
        test, _ = read_predictions(Path(m["out"]) / "predictions.parquet")
        t_only = np.nanmean(
            ece_and_brier(
                test["labels"], apply_temperatures(test["logits"], fit_temperatures(val["logits"], val["labels"]))
            )[0]
        )
        print(_row(name, m, None, t_only))
    for label, m in ensembles.items():
        best = max(evaluations[n.split("/")[0]]["mean_auc"] for n in m["member_names"])
        print(_row(label, m, m["mean_auc"] - best, None))


def _row(name: str, m: dict, delta: float | None, t_only: float | None) -> str:
    ci = m["mean_auc_ci95"]
    cal = m["calibration"]
    return (
        f"{name:<52} {m['mean_auc']:>8.4f}  {ci[0]:.3f}-{ci[1]:.3f}   {'' if delta is None else f'{delta:+.4f}':>8}  "
        f"{cal['ece_mean']['before']:>8.4f} {cal['ece_mean']['after']:>8.4f} {'' if t_only is None else f'{t_only:.4f}':>8}  "
        f"{cal['brier_mean']['before']:>9.4f} {cal['brier_mean']['after']:>9.4f}"
    )


if __name__ == "__main__":
    main()
