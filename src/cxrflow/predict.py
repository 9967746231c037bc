"""Finding probabilities for new image files from a trained run.

Images go through exactly the ETL's preprocessing (:func:`cxrflow.imaging.preprocess`: decode any
mode the ETL accepts to 8-bit gray, resize to the run's size) and the loader's normalisation
(:func:`cxrflow.loader.to_model_input` with the training store's pixel mean and std), so a file
gives the same input the model saw in training. Everything needed (model, size, pixel statistics,
label names) comes from the checkpoint, so prediction works after the store is gone.

An unreadable file is reported as one ``error: <file>: <reason>`` line; the other files still get
their predictions and the exit status is 2.

A run that fuses demographics needs them: ``--age 63 --sex F --view AP`` for every file, or
``--metadata CSV`` with ``image,age,sex,view`` rows (the word ``unknown`` or an empty cell for a
value that is not known); they are encoded exactly as in training (:mod:`cxrflow.demographics`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cxrflow.demographics import FIELDS, encode, parse_age, parse_choice, read_metadata_csv
from cxrflow.errors import CxrflowError

#: (age, sex, view) of one image; None for a value that is not known.
Demographics = tuple[float | None, str | None, str | None]


@dataclass
class Predictor:
    """A loaded model with what it needs to turn an image file into probabilities."""

    model: torch.nn.Module
    size: int
    mean: float
    std: float
    label_names: list[str]
    checkpoint: Path
    device: torch.device
    #: Per-finding decision thresholds (Youden's J on the validation split, from ``cxrflow
    #: evaluate``), or None when the run has not been evaluated at this checkpoint.
    thresholds: dict[str, float] | None = None

    @property
    def uses_demographics(self) -> bool:
        return bool(getattr(self.model, "uses_demographics", False))


def _pixel_stats(config: dict, size: int) -> tuple[float, float]:
    """Training pixel (mean, std): recorded in the run's config, else read from its store's manifest."""
    if "pixel_mean" in config and "pixel_std" in config:
        return float(config["pixel_mean"]), float(config["pixel_std"])
    store = config.get("store")
    if store:
        from cxrflow.store import pixel_stats, read_manifest

        try:
            return pixel_stats(read_manifest(store), size)
        except (CxrflowError, KeyError):
            pass
    raise CxrflowError(
        "the checkpoint does not record the training pixel mean/std and its store is not readable; "
        "pass --store with the store the run was trained on"
    )


def load_predictor(
    run: str | os.PathLike | None,
    checkpoint: str | None = None,
    *,
    device: str = "cpu",
    store: str | os.PathLike | None = None,
) -> Predictor:
    """Load a run's checkpoint (default: best_finetune, else best_kt) for prediction."""
    from cxrflow.evaluate import resolve_checkpoint
    from cxrflow.inference import resolve_device
    from cxrflow.models import load_checkpoint

    run_dir = Path(run) if run is not None else None
    thresholds = None
    if run_dir is not None and not run_dir.is_dir():
        raise CxrflowError("no such run folder", run_dir)
    if run_dir is None:
        if not checkpoint:
            raise CxrflowError("give --run or a --checkpoint file")
        path = Path(checkpoint)
        if not path.is_file():
            raise CxrflowError("no such checkpoint", path)
    else:
        name, path = resolve_checkpoint(run_dir, checkpoint)
        thresholds = _validation_thresholds(run_dir, name)
    device = resolve_device(device)
    model, ckpt = load_checkpoint(path, map_location=device)
    config = dict(ckpt.get("config") or {})
    if store is not None:
        config["store"] = str(store)
    size = int(config["size"])
    mean, std = _pixel_stats(config, size)
    return Predictor(model.eval(), size, mean, std, list(ckpt["label_names"]), Path(path), device, thresholds)


def _validation_thresholds(run: Path, checkpoint_name: str) -> dict[str, float] | None:
    """The validation-Youden thresholds ``cxrflow evaluate`` recorded for this checkpoint, if any.

    Every evaluation of a checkpoint chooses its thresholds on the validation split, so any of
    ``RUN/eval-<split>-<checkpoint>/metrics.json`` will do; findings without one are left out.
    """
    for path in sorted(run.glob(f"eval-*-{checkpoint_name}/metrics.json")):
        try:
            recorded = json.loads(path.read_text()).get("threshold") or {}
        except (OSError, json.JSONDecodeError):
            continue
        return {name: float(t) for name, t in recorded.items() if t is not None}
    return None


def predict_files(
    predictor: Predictor,
    paths: Sequence[str | os.PathLike],
    *,
    batch_size: int = 32,
    demographics: dict[str, Demographics] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Probabilities for each readable file, and one error per unreadable one, both in input order.

    Returns ``(predictions, errors)``: ``{"image": path, "probabilities": {finding: p}}`` and
    ``{"image": path, "error": reason}``. ``demographics`` (path as given -> (age, sex, view)) is
    required for a fused run (an image without an entry is an error of that image) and unused otherwise.
    """
    if predictor.uses_demographics and demographics is None:
        raise CxrflowError(
            f"the run fuses demographics ({predictor.checkpoint}): give --age, --sex and --view, or --metadata CSV"
        )
    from cxrflow.imaging import preprocess
    from cxrflow.inference import batch_logits

    predictions: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    pending: list[tuple[str, np.ndarray, Demographics | None]] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.from_numpy(np.stack([img for _, img, _ in pending])[:, None])
        demo = torch.from_numpy(encode([d for _, _, d in pending])) if predictor.uses_demographics else None
        logits = batch_logits(predictor.model, batch, predictor.mean, predictor.std, predictor.device, demo)
        probs = torch.sigmoid(logits).numpy()
        for (name, _, known), row in zip(pending, probs):
            probabilities = dict(zip(predictor.label_names, map(float, row)))
            result: dict[str, Any] = {"image": name, "probabilities": probabilities}
            if predictor.uses_demographics:
                result["demographics"] = dict(zip(FIELDS, known))
            if predictor.thresholds is not None:
                result["positive"] = [
                    n for n in predictor.label_names if n in predictor.thresholds and probabilities[n] >= predictor.thresholds[n]
                ]
            predictions.append(result)
        pending.clear()

    for p in paths:
        name = str(p)
        path = Path(p)
        entry = None
        if predictor.uses_demographics:
            entry = demographics.get(name, demographics.get(path.name))
            if entry is None:
                errors.append({"image": name, "error": "no age, sex and view for it in --metadata"})
                continue
        if not path.exists():
            errors.append({"image": name, "error": "no such file"})
            continue
        if not path.is_file():
            errors.append({"image": name, "error": "not a file"})
            continue
        try:
            gray = preprocess(path, [predictor.size])[predictor.size]
        except CxrflowError as exc:
            errors.append({"image": name, "error": exc.message})
            continue
        except OSError as exc:
            errors.append({"image": name, "error": f"cannot read: {exc.strerror or exc}"})
            continue
        pending.append((name, gray, entry))
        if len(pending) >= batch_size:
            flush()
    flush()
    order = {str(p): i for i, p in enumerate(paths)}
    predictions.sort(key=lambda r: order[r["image"]])
    return predictions, errors


def format_table(predictions: Sequence[dict], label_names: Sequence[str]) -> str:
    """One line per image: the file, one probability per finding (header = finding names) and, when
    the run was evaluated, the findings at or above their validation-Youden threshold."""
    if not predictions:
        return ""
    width = max(len("image"), *(len(r["image"]) for r in predictions))
    cols = [max(len(n), 5) for n in label_names]
    flagged = "positive" in predictions[0]
    header = f"{'image':<{width}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(label_names, cols))
    lines = [header + ("  positive at the validation threshold" if flagged else "")]
    for r in predictions:
        line = f"{r['image']:<{width}}  " + "  ".join(f"{r['probabilities'][n]:>{w}.3f}" for n, w in zip(label_names, cols))
        if flagged:
            line += "  " + (", ".join(r["positive"]) or "none")
        lines.append(line)
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images", nargs="*", metavar="IMAGE",
        help="PNG or JPEG files (any size, gray, RGB, RGBA or 16-bit); default: the images of --metadata",
    )
    parser.add_argument("--run", default=None, help="run folder written by 'cxrflow train'")
    parser.add_argument(
        "--checkpoint", default=None, help="best_finetune, best_kt, last or a .pt path (default: best_finetune, else best_kt)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--store", default=None, help="the training store, only for checkpoints that lack pixel statistics")
    parser.add_argument("--age", default=None, help="patient age in years, for runs trained with --fusion demographics")
    parser.add_argument("--sex", default=None, help="M or F (or unknown), for fused runs")
    parser.add_argument("--view", default=None, help="view position PA or AP (or unknown), for fused runs")
    parser.add_argument("--metadata", default=None, metavar="CSV",
                        help="image,age,sex,view rows for many files (image as given, or its file name)")


def demographics_from_args(args: argparse.Namespace) -> tuple[list[str], dict[str, Demographics] | None]:
    """The images to score and their demographics from --age/--sex/--view or --metadata (None: none given)."""
    flags = {f: getattr(args, f) for f in FIELDS}
    given = [f for f, v in flags.items() if v is not None]
    images = list(args.images)
    if args.metadata is not None:
        if given:
            raise CxrflowError(f"--metadata and --{given[0]} exclude each other; put the values in the CSV")
        table = read_metadata_csv(args.metadata)
        if not images:
            base = Path(args.metadata).parent
            images = [name if Path(name).is_absolute() else str(base / name) for name in table]
            table = dict(zip(images, table.values()))
        return images, table
    if not images:
        raise CxrflowError("give at least one IMAGE (or --metadata CSV)")
    if not given:
        return images, None
    if len(given) < len(FIELDS):
        missing = ", ".join(f"--{f}" for f in FIELDS if f not in given)
        raise CxrflowError(f"give --age, --sex and --view together (missing {missing}; 'unknown' is allowed)")
    entry = (parse_age(flags["age"]), parse_choice(flags["sex"], "sex", "--sex"), parse_choice(flags["view"], "view", "--view"))
    return images, {str(image): entry for image in images}


def run(args: argparse.Namespace) -> int:
    if args.run is None and args.checkpoint is None:
        raise CxrflowError("give --run RUN (or --checkpoint FILE.pt)")
    images, demographics = demographics_from_args(args)
    predictor = load_predictor(args.run, args.checkpoint, device=args.device, store=args.store)
    if demographics is not None and not predictor.uses_demographics:
        print("note: this run does not use demographics; --age/--sex/--view/--metadata are ignored", file=sys.stderr)
    predictions, errors = predict_files(
        predictor, images, batch_size=max(1, args.batch_size), demographics=demographics
    )
    if args.json:
        print(
            json.dumps(
                {
                    "checkpoint": str(predictor.checkpoint),
                    "size": predictor.size,
                    "label_names": predictor.label_names,
                    "thresholds": predictor.thresholds,
                    "predictions": predictions,
                    "errors": errors,
                },
                indent=2,
            )
        )
    elif predictions:
        print(format_table(predictions, predictor.label_names))
    for e in errors:
        print(f"error: {e['image']}: {e['error']}", file=sys.stderr)
    return 2 if errors else 0
