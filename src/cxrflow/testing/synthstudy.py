"""A study in the exact file shapes of cxrflow's run, evaluation, ensemble and localization folders.

For tests and benchmarks of ``cxrflow report``: a synthetic store (:mod:`cxrflow.testing.synthstore`), run
folders with ``config.json``, evaluation folders with ``metrics.json`` (computed by
:func:`cxrflow.metrics.summarize` from predictions with a planted signal), ``predictions.parquet``
and figures, optionally calibration keys and ``reliability.png`` (the shape calibration writes), a
``localize-*`` folder (the shape ``cxrflow localize`` writes), an ensemble folder and small real checkpoints. No
training is run: building a study takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cxrflow import __version__

#: The paper's five training runs and the stages each is evaluated at: nine evaluations.
PAPER_RUNS: tuple[tuple[str, int, tuple[str, ...]], ...] = (
    ("simple_cnn", 256, ("finetune",)),
    ("resnet50", 256, ("kt", "finetune")),
    ("resnet50", 512, ("kt", "finetune")),
    ("densenet121", 256, ("kt", "finetune")),
    ("densenet121", 512, ("kt", "finetune")),
)


def _test_split(store: Path, size: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    from cxrflow.data.store import split_dir

    table = pq.read_table(split_dir(store, size, "test"), columns=["image_id", "patient_id", "labels"])
    labels = np.array(table.column("labels").to_pylist(), dtype=np.uint8)
    return table.column("image_id").to_pylist(), table.column("patient_id").to_numpy(), labels


def _figures(
    folder: Path, labels: np.ndarray, probs: np.ndarray, names: Sequence[str], title: str, calibrated: bool
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cxrflow.plots import plot_roc, plot_training_curves

    plot_roc(labels, probs, names, title=f"ROC curves, {title}").savefig(folder / "roc.png", dpi=110)
    records = [{"stage": s, "epoch": e, "train_loss": 1.0 / (e + i), "val_loss": 1.1 / (e + i), "val_auc_mean": 0.6 + 0.05 * e + 0.02 * i}
               for i, s in enumerate(("kt", "finetune")) for e in (1, 2, 3)]  # fmt: skip
    plot_training_curves(records, title=f"Training curves, {title}").savefig(folder / "curves.png", dpi=110)
    if calibrated:
        fig = Figure(figsize=(5, 5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], "--", color="0.5", label="perfect calibration")
        ax.plot(np.linspace(0.05, 0.95, 10), np.linspace(0.05, 0.95, 10) ** 1.3, "o-", label="model")
        ax.set(xlabel="Predicted probability", ylabel="Observed frequency", title=f"Reliability, {title}")
        ax.legend()
        fig.savefig(folder / "reliability.png", dpi=110)


def _calibration(names: Sequence[str], rng: np.random.Generator) -> dict[str, Any]:
    before = {n: float(rng.uniform(0.05, 0.2)) for n in names}
    after = {n: float(v / 3) for n, v in before.items()}
    brier_b = {n: float(rng.uniform(0.1, 0.2)) for n in names}
    brier_a = {n: float(v * 0.9) for n, v in brier_b.items()}
    return {
        "method": "temperature", "fitted_on": "val", "bins": 15,
        "temperature": {n: float(rng.uniform(0.8, 2.0)) for n in names},
        "ece": {"before": before, "after": after},
        "ece_mean": {"before": float(np.mean(list(before.values()))), "after": float(np.mean(list(after.values())))},
        "brier": {"before": brier_b, "after": brier_a},
        "brier_mean": {"before": float(np.mean(list(brier_b.values()))), "after": float(np.mean(list(brier_a.values())))},
    }  # fmt: skip


def write_evaluation(
    folder: Path,
    run: Path,
    store: Path,
    *,
    model: str,
    size: int,
    stage: str,
    signal: float,
    seed: int,
    store_size: int,
    calibrated: bool = False,
    figures_from: Path | None = None,
    n_boot: int = 50,
) -> dict[str, Any]:
    """One evaluation folder as ``cxrflow evaluate`` writes it, over the store's test split."""
    import pyarrow.parquet as pq

    from cxrflow.data.store import pixel_stats, read_manifest
    from cxrflow.metrics import summarize, youden_threshold
    from cxrflow.operating import operating_report
    from cxrflow.runs import predictions_table

    manifest = read_manifest(store)
    names = manifest["label_names"]
    ids, patients, labels = _test_split(store, store_size)
    rng = np.random.default_rng(seed)
    logits = signal * (2.0 * labels - 1.0) + rng.normal(0.0, 1.0, labels.shape)
    probs = 1.0 / (1.0 + np.exp(-logits))
    thresholds = np.array([youden_threshold(labels[:, j], probs[:, j]) for j in range(len(names))])
    metrics = summarize(labels, probs, patients, names, thresholds, n_boot=n_boot, seed=0)
    metrics.update(operating_report(labels, probs, patients, names, thresholds, n_boot=n_boot, seed=0))
    mean, std = pixel_stats(manifest, store_size)
    checkpoint = run / f"best_{stage}.pt"
    if not checkpoint.exists() and folder != run:  # an evaluation belongs to a checkpoint file (see evaluation_status)
        run.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(f"synthetic study: stands for {model} {size}px {stage}".encode())
    metrics = {
        "run": str(run.resolve()), "run_name": run.name, "checkpoint": f"best_{stage}",
        "checkpoint_path": str(checkpoint.resolve()), "stage": stage, "epoch": 3, "model": model, "size": size,
        "split": "test", "store": str(store), "loss": 0.5, "pixel_mean": mean, "pixel_std": std,
        "threshold_split": "val", **metrics, "cxrflow_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "checkpoint_sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest() if checkpoint.is_file() else None,
        "figures": ["roc.png", "curves.png"] + (["reliability.png"] if calibrated else []),
    }  # fmt: skip
    if calibrated:
        metrics["calibration"] = _calibration(names, rng)
    folder.mkdir(parents=True, exist_ok=True)
    pred = {"image_id": ids, "patient_id": patients, "probs": probs, "labels": labels}
    pq.write_table(predictions_table(pred, names), folder / "predictions.parquet")
    if figures_from is not None:
        for name in metrics["figures"]:
            shutil.copyfile(figures_from / name, folder / name)
    else:
        _figures(folder, labels, probs, names, f"{model} {size}px {stage}", calibrated)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def write_run_config(run: Path, store: Path, model: str, size: int, label_names: Sequence[str]) -> None:
    """``RUN/config.json`` in the trainer's shape (TrainConfig fields, label names, stages)."""
    from cxrflow.modelling.config import TrainConfig

    config = TrainConfig(store=str(store), size=size, model=model, out=str(run), pretrained="none", seed=0)
    saved = {**config.to_dict(), "label_names": list(label_names), "stages": [vars(s) for s in config.stages()]}
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(saved, indent=2))


def write_checkpoint(
    run: Path,
    stage: str,
    model: str,
    size: int,
    label_names: Sequence[str],
    pixel_stats: tuple[float, float] = (0.5, 0.25),
) -> Path:
    """A real checkpoint of a randomly initialised model (what ``load_checkpoint`` reads), recording
    the pixel (mean, std) it stands to have been trained with, as the trainer does."""
    import torch

    from cxrflow.modelling.models import create_model

    torch.manual_seed(0)
    net = create_model(model, len(label_names), pretrained="none")
    path = run / f"best_{stage}.pt"
    config = {"model": model, "size": size, "pixel_mean": float(pixel_stats[0]), "pixel_std": float(pixel_stats[1])}
    torch.save({"model": net.state_dict(), "config": config, "label_names": list(label_names),
                "stage": stage, "epoch": 3}, path)  # fmt: skip
    return path


def write_localization(run: Path, label_names: Sequence[str], split: str = "test") -> Path:
    """``RUN/localize-<split>-best_finetune/`` in the shape ``cxrflow localize`` writes, with a gallery figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cxrflow.data.boxes import IOU_THRESHOLDS

    folder = run / f"localize-{split}-best_finetune"
    folder.mkdir(parents=True, exist_ok=True)
    boxed = list(label_names)[:8]
    thresholds = ["0.1", "0.25", "0.5", "0.75", "0.9"]
    acc = {t: {**{n: round(0.9 - 0.15 * i - 0.01 * k, 3) for k, n in enumerate(boxed)}, "overall": round(0.85 - 0.15 * i, 3)}
           for i, t in enumerate(thresholds)}  # fmt: skip
    checkpoint = run / "best_finetune.pt"  # a localization belongs to a checkpoint file (see localization_status)
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest() if checkpoint.is_file() else None
    loc = {
        "run": str(run), "checkpoint": "best_finetune", "checkpoint_path": str(checkpoint.resolve()),
        "checkpoint_sha256": sha, "stage": "finetune", "epoch": 3, "split": split, "method": "gradcam",
        "thresholds": [float(t) for t in thresholds], "accuracy_iobb": acc,
        "accuracy_iou": {f"{t:g}": {n: round(v / (2 + i), 3) for n, v in acc["0.1"].items()}
                         for i, t in enumerate(IOU_THRESHOLDS)},  # fmt: skip
        "baseline": {"accuracy_iobb": {t: {n: round(v / 3, 3) for n, v in row.items()} for t, row in acc.items()}},
        "wang2017": {"accuracy_iobb": {"0.1": {"Atelectasis": 0.6875}}},
        "fp_per_image": {n: 0.5 for n in boxed}, "n_boxes": {n: 10 + k for k, n in enumerate(boxed)},
        "unscored": [{"image_id": "x.png", "finding": boxed[0], "reason": "box outside the image"}],
        "figures": ["gallery.png"],
    }  # fmt: skip
    fig = Figure(figsize=(6, 3), layout="constrained")
    FigureCanvasAgg(fig)
    for i, ax in enumerate(fig.subplots(1, 3)):
        ax.imshow(np.random.default_rng(i).random((32, 32)), cmap="gray")
        ax.set_title(boxed[i])
        ax.axis("off")
    fig.savefig(folder / "gallery.png", dpi=90)
    (folder / "localization.json").write_text(json.dumps(loc, indent=2))
    return folder


def write_ensemble(
    folder: Path,
    members: Sequence[Path],
    store: Path,
    store_size: int,
    seed: int = 99,
    figures_from: Path | None = None,
) -> dict:
    """An ensemble folder (the shape ``cxrflow ensemble`` writes): an evaluation with ``kind``, ``method`` and ``members``."""
    first = json.loads((members[0] / "metrics.json").read_text())
    metrics = write_evaluation(folder, folder, store, model="ensemble(mean)", size=first["size"], stage="finetune",
                               signal=1.6, seed=seed, store_size=store_size, calibrated=True,
                               figures_from=figures_from)  # fmt: skip
    metrics.update(
        kind="ensemble", method="mean", model="ensemble(mean)", run_name=folder.name,
        members=[
            {"run": str(m.parent), "eval": str(m), "checkpoint_sha256": json.loads((m / "metrics.json").read_text())["checkpoint_sha256"]}
            for m in members
        ],
    )  # fmt: skip
    for key in ("run", "checkpoint_path", "checkpoint", "stage"):
        metrics.pop(key, None)
    (folder / "curves.png").unlink()  # an ensemble has no training of its own
    metrics["figures"] = ["roc.png", "reliability.png"]
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def write_study(
    root: str | os.PathLike,
    *,
    runs: Sequence[tuple[str, int, Sequence[str]]] = PAPER_RUNS,
    test_rows: int = 40,
    store_size: int = 64,
    calibrated: bool = True,
    localization: bool = True,
    ensemble: bool = True,
    checkpoints: bool = False,
    draw_each: bool = False,
    seed: int = 0,
    synthetic: bool = True,
) -> dict[str, Any]:
    """Write a store and the runs' folders under ``root``; returns their paths.

    ``draw_each=False`` draws the figures once and copies them (fast); ``checkpoints`` writes real
    random-weight checkpoints (simple_cnn runs only, to stay small); localization goes to the first run.
    ``synthetic=False`` presents the store as the NIH release with its official lists (its manifest
    no longer says synthetic), for the parts of a report that appear only for real collections.
    """
    from cxrflow.data.store import pixel_stats
    from cxrflow.testing.synthstore import write_synthetic_store

    root = Path(root)
    store = root / "store"
    manifest = write_synthetic_store(
        store, sizes=(store_size,), rows={"train": 16, "val": 8, "test": test_rows}, seed=seed
    )
    if not synthetic:
        from cxrflow.atomic import write_json_atomic

        manifest.pop("synthetic", None)
        manifest["split"] = {**manifest["split"], "mode": "official-lists"}
        write_json_atomic(store / "_manifest.json", manifest)
    names = manifest["label_names"]
    stats = pixel_stats(manifest, store_size)  # what evaluations record, as the checkpoints do
    run_dirs, evals, first_eval = [], [], None
    for i, (model, size, stages) in enumerate(runs):
        run = root / "runs" / f"{model}-{size}"
        write_run_config(run, store, model, size, names)
        run_dirs.append(run)
        for k, stage in enumerate(stages):
            if checkpoints and model == "simple_cnn":
                write_checkpoint(run, stage, model, size, names, stats)
            folder = run / f"eval-test-best_{stage}"
            write_evaluation(folder, run, store, model=model, size=size, stage=stage, signal=0.4 + 0.15 * i + 0.1 * k,
                             seed=seed + 10 * i + k, store_size=store_size, calibrated=calibrated,
                             figures_from=None if draw_each or first_eval is None else first_eval)  # fmt: skip
            first_eval = first_eval or folder
            evals.append(folder)
    if localization and run_dirs:
        write_localization(run_dirs[0], names)
    ensemble_dir = None
    if ensemble and len(evals) >= 2:
        ensemble_dir = root / "ensembles" / "mean-all"
        write_ensemble(
            ensemble_dir,
            evals[-2:],
            store,
            store_size,
            figures_from=None if draw_each or not calibrated else first_eval,
        )
    return {
        "root": root,
        "store": store,
        "runs": run_dirs,
        "evaluations": evals,
        "ensemble": ensemble_dir,
        "label_names": names,
    }


def write_cross_evaluation(
    run: Path,
    store: Path,
    findings: Sequence[str],
    *,
    stage: str = "finetune",
    signal: float = 0.6,
    seed: int = 5,
    store_size: int = 64,
    n_boot: int = 50,
) -> Path:
    """``RUN/eval-<store>-test-best_<stage>/`` as ``cxrflow evaluate --store OTHER`` writes it: the run's
    evaluation of the same checkpoint, redone on another store (of the run's finding names) and scored
    on ``findings`` only; the run's other findings are ``not_labelled`` there."""
    import pyarrow.parquet as pq

    from cxrflow.data.store import read_manifest, store_identity
    from cxrflow.metrics import summarize, youden_threshold
    from cxrflow.operating import operating_report
    from cxrflow.runs import predictions_table

    own = json.loads((run / f"eval-test-best_{stage}" / "metrics.json").read_text())
    names = list(own["label_names"])
    manifest = read_manifest(store)
    ids, patients, labels = _test_split(store, store_size)
    labels = labels[:, [list(manifest["label_names"]).index(n) for n in findings]]
    rng = np.random.default_rng(seed)
    probs = 1.0 / (1.0 + np.exp(-(signal * (2.0 * labels - 1.0) + rng.normal(0.0, 1.0, labels.shape))))
    thresholds = np.array([youden_threshold(labels[:, j], probs[:, j]) for j in range(len(findings))])
    scored = summarize(labels, probs, patients, list(findings), thresholds, n_boot=n_boot, seed=0)
    scored.update(operating_report(labels, probs, patients, list(findings), thresholds, n_boot=n_boot, seed=0))
    metrics = {
        **{k: own[k] for k in ("run", "run_name", "checkpoint", "checkpoint_path", "checkpoint_sha256", "stage",
                               "epoch", "model", "size", "pixel_mean", "pixel_std")},
        "split": "test", "store": str(store.resolve()), "store_identity": store_identity(store, manifest, store_size),
        "collections": {"model": "store", "store": store.name}, "alignment": {n: n for n in findings},
        "not_labelled": [n for n in names if n not in findings], "not_predicted": [], "map": [],
        "model_label_names": names, "threshold_source": "fitted on the val split", "threshold_split": "val",
        **scored, "synthetic": True, "cxrflow_version": __version__, "figures": [],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    folder = run / f"eval-{store.name}-test-best_{stage}"
    folder.mkdir(parents=True, exist_ok=True)
    pred = {"image_id": ids, "patient_id": patients, "probs": probs, "labels": labels}
    pq.write_table(predictions_table(pred, list(findings)), folder / "predictions.parquet")
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return folder
