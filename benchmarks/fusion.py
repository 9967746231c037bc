"""Demographics fusion against its two parts: image-only, fused and demographics-only AUC per finding.

A synthetic release whose demographic findings (``cxrflow synth --demographic-findings``:
Emphysema, Edema and Cardiomegaly) follow age, sex and view and leave only a faint mark on the
image, the Spark ETL at ``--size``, then two simple_cnn runs with the same recipe, one image-only
and one ``--fusion demographics``, each evaluated on the test split. Prints, per finding, the AUC
of the image-only run, the fused run, and a logistic regression on age, sex and view alone
(fitted on the same training split, scored on the same test images), the fused run's margin over
the better of its two parts, and the time per training image of both runs (their ratio), from
the training loop and from interleaved training steps of the two models on the same batches.
Finished runs in ``--work`` are reused, so an interrupted benchmark continues.

    python benchmarks/fusion.py --work /tmp/fusion-bench
    python benchmarks/fusion.py --work /tmp/fusion-bench --patients 3000 --size 64 --epochs 12
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

#: Design ablations of the fused run (``--variants``): what the default design's choices are worth.
#: ``no-init``: the demographic term starts as a new layer instead of the logistic-regression fit;
#: ``no-init-lr10``: the same with ten times the stage's learning rate for the term; ``lr10``: the fit,
#: then ten times the stage's learning rate.
VARIANTS = {
    "no-init": {"init": False, "lr_factor": 1.0},
    "no-init-lr10": {"init": False, "lr_factor": 10.0},
    "lr10": {"init": True, "lr_factor": 10.0},
}


@contextlib.contextmanager
def variant(name: str | None):
    """Train under one ablation of the fused design (nothing changes for ``None``)."""
    from cxrflow.modelling import fusion, train

    if name is None:
        yield
        return
    settings, saved = VARIANTS[name], (train.init_from_store, fusion.FUSION_LR_FACTOR)
    try:
        if not settings["init"]:
            train.init_from_store = lambda *a, **k: "demographic term not fitted (benchmark ablation)"
        fusion.FUSION_LR_FACTOR = settings["lr_factor"]
        yield
    finally:
        train.init_from_store, fusion.FUSION_LR_FACTOR = saved


def train_and_evaluate(
    store: Path, run: Path, fusion: str, args: argparse.Namespace, ablation: str | None = None
) -> dict:
    """Train (or reuse) one run with the benchmark's recipe and evaluate (or reuse) it on test."""
    from cxrflow.modelling.config import resolve_config
    from cxrflow.modelling.train import train
    from cxrflow.results.evaluate import evaluate_run

    if not (run / "done.json").exists():
        config = resolve_config(
            "default",
            None,
            {
                "store": str(store),
                "size": args.size,
                "model": "simple_cnn",
                "out": str(run),
                "pretrained": "none",
                "fusion": fusion,
                "seed": args.seed,
                "device": "cpu",
                "finetune.epochs": args.epochs,
                "min_steps": 0,
                "warmup_steps": 20,
                "batch_size": 32,
            },
        )
        with variant(ablation):
            train(config, resume=run.exists(), quiet=True, log=lambda _: None)
    done = run / "eval-test-best_finetune" / "metrics.json"
    metrics = json.loads(done.read_text()) if done.exists() else evaluate_run(run, n_boot=200, device="cpu")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seconds = sum(r["train_images"] / r["images_per_second"] for r in rows)
    metrics["ms_per_image"] = 1000 * seconds / sum(r["train_images"] for r in rows)
    metrics["val_auc_by_epoch"] = [r["val_auc"] for r in rows]
    return metrics


def demographics_only(store: Path, size: int) -> dict[str, float]:
    """Test AUC per finding of a logistic regression on age, sex and view fitted on the train split."""
    from cxrflow.data.store import read_manifest
    from cxrflow.metrics import per_class_auc
    from cxrflow.modelling.fusion import fit_logistic, logistic_scores, read_split_demographics

    names = read_manifest(store)["label_names"]
    train = read_split_demographics(store, size, "train", names)
    test = read_split_demographics(store, size, "test", names)
    fit = fit_logistic(train["demographics"], train["labels"], train["known"])
    aucs = per_class_auc(test["labels"], logistic_scores(fit, test["demographics"]))
    return dict(zip(names, map(float, aucs)))


def interleaved_step_ratio(store: Path, size: int, steps: int = 30) -> tuple[float, float]:
    """ms per training image of an image-only and a fused simple_cnn, their steps interleaved on the
    same batches (so that the machine's other load falls on both alike)."""
    import torch
    from torch import nn

    from cxrflow.data.loader import make_loader
    from cxrflow.data.store import pixel_stats, read_manifest
    from cxrflow.modelling.fusion import param_groups
    from cxrflow.modelling.inference import model_input
    from cxrflow.modelling.models import create_model

    manifest = read_manifest(store)
    mean, std = pixel_stats(manifest, size)
    k = len(manifest["label_names"])
    torch.manual_seed(0)
    models = {f: create_model("simple_cnn", k, fusion=f) for f in ("none", "demographics")}
    optims = {f: torch.optim.Adam(param_groups(m, list(m.parameters()), 1e-3, 0.0), lr=1e-3) for f, m in models.items()}
    loss_fn = nn.BCEWithLogitsLoss()
    spent = {f: 0.0 for f in models}
    images = 0
    loader = make_loader(store, size, "train", batch_size=32, shuffle=True, seed=0)
    for i, batch in enumerate(loader):
        if i >= steps:
            break
        x = model_input(batch["image"], mean, std, torch.device("cpu"))
        images += x.shape[0]
        for f in ("none", "demographics") if i % 2 else ("demographics", "none"):
            t0 = time.perf_counter()
            loss = loss_fn(models[f](x, demographics=batch["demographics"]), batch["labels"])
            optims[f].zero_grad()
            loss.backward()
            optims[f].step()
            spent[f] += time.perf_counter() - t0
    return 1000 * spent["none"] / images, 1000 * spent["demographics"] / images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1500, help="synthetic patients (~3.6 images each)")
    parser.add_argument("--size", type=int, default=48, help="training size (small, for CPUs)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", required=True, help="folder for data, store and runs (reused)")
    parser.add_argument(
        "--variants",
        nargs="*",
        default=[],
        choices=list(VARIANTS),
        help="also train these ablations of the fused design and show their AUC",
    )
    args = parser.parse_args()

    import torch

    from cxrflow.data.etl import run_etl
    from cxrflow.data.synth import DEMOGRAPHIC_FINDINGS, synthesize

    torch.set_num_threads(args.threads)
    base = Path(args.work) / f"p{args.patients}-{args.size}px"
    store = base / "store"
    if not (store / "_manifest.json").exists():
        synthesize(
            base / "data",
            patients=args.patients,
            size=2 * args.size,
            seed=args.seed,
            overwrite=True,
            demographic_findings=True,
        )
        run_etl(base / "data", store, [args.size], master="local[2]", overwrite=True)
    plain = train_and_evaluate(store, base / f"none-e{args.epochs}", "none", args)
    fused = train_and_evaluate(store, base / f"demographics-e{args.epochs}", "demographics", args)
    ablations = {
        v: train_and_evaluate(store, base / f"demographics-{v}-e{args.epochs}", "demographics", args, v)
        for v in args.variants
    }
    alone = demographics_only(store, args.size)
    names = plain["label_names"]
    extra = "".join(f" {v:>12}" for v in ablations)
    print(f"{'finding':<20} {'image':>6} {'fused':>6} {'demo':>6} {'fused-max':>9}  {'demog.?':<7}{extra}")
    margins, others = [], []
    for n in names:
        best = max(plain["auc"][n], alone[n])
        margin = fused["auc"][n] - best
        if n in DEMOGRAPHIC_FINDINGS:
            margins.append(margin)
        else:
            others.append(fused["auc"][n] - plain["auc"][n])
        flag = "demog." if n in DEMOGRAPHIC_FINDINGS else ""
        cells = "".join(f" {m['auc'][n]:>12.3f}" for m in ablations.values())
        print(
            f"{n:<20} {plain['auc'][n]:>6.3f} {fused['auc'][n]:>6.3f} {alone[n]:>6.3f} {margin:>+9.3f}  {flag:<7}{cells}"
        )
    print(
        f"mean AUC: image-only {plain['mean_auc']:.4f}, fused {fused['mean_auc']:.4f} "
        f"(lift {fused['mean_auc'] - plain['mean_auc']:+.4f})"
    )
    for v, m in ablations.items():
        print(f"mean AUC of ablation {v}: {m['mean_auc']:.4f}")
    print(f"demographic findings: worst fused - max(image-only, demographics-only) {min(margins):+.3f}")
    print(f"other findings: mean fused - image-only {sum(others) / len(others):+.4f}")
    ratio = fused["ms_per_image"] / plain["ms_per_image"]
    print(
        f"training loop: {plain['ms_per_image']:.3f} ms/image image-only, {fused['ms_per_image']:.3f} fused "
        f"(ratio {ratio:.3f})"
    )
    a, b = interleaved_step_ratio(store, args.size)
    print(f"interleaved steps: {a:.3f} ms/image image-only, {b:.3f} fused (ratio {b / a:.3f})")
    for n in DEMOGRAPHIC_FINDINGS:
        curve = " ".join(f"{e[n]:.3f}" for e in fused["val_auc_by_epoch"])
        print(f"fused val AUC by epoch, {n}: {curve}")
    shortcut = (plain.get("demographics_only") or {}).get("shortcut")
    if shortcut is not None:
        print(f"image-only evaluation's shortcut findings: {', '.join(shortcut) or 'none'}")


if __name__ == "__main__":
    main()
