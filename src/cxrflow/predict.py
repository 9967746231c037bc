"""Finding probabilities for new image files from a trained run.

Images go through exactly the ETL's preprocessing (:func:`cxrflow.imaging.preprocess`: decode any
mode the ETL accepts to 8-bit gray, resize to the run's size) and the loader's normalisation
(:func:`cxrflow.loader.to_model_input` with the pixel mean and std recorded in the checkpoint at
training time), so a file gives the same input the model saw in training. Everything needed (model,
size, pixel statistics, label names) comes from the checkpoint, so prediction works after the store
is gone. Thresholds come from an evaluation of the same checkpoint only (checked by its hash).

An unreadable file is reported as one ``error: <file>: <reason>`` line; the other files still get
their predictions and the exit status is 2.
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

from cxrflow.errors import CxrflowError


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
    #: Why an evaluation of the run was not used for thresholds (it belongs to another checkpoint).
    note: str | None = None


def load_predictor(
    run: str | os.PathLike | None,
    checkpoint: str | None = None,
    *,
    device: str = "cpu",
    store: str | os.PathLike | None = None,
) -> Predictor:
    """Load a run's checkpoint (default: best_finetune, else best_kt) for prediction."""
    from cxrflow.evaluate import resolve_checkpoint
    from cxrflow.inference import resolve_device, training_pixel_stats
    from cxrflow.models import load_checkpoint

    run_dir = Path(run) if run is not None else None
    thresholds, note = None, None
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
        thresholds, note = _validation_thresholds(run_dir, name)
    device = resolve_device(device)
    model, ckpt = load_checkpoint(path, map_location=device)
    config = dict(ckpt.get("config") or {})
    if store is not None:
        config["store"] = str(store)
    size = int(config["size"])
    mean, std = training_pixel_stats(config, size)
    return Predictor(model.eval(), size, mean, std, list(ckpt["label_names"]), Path(path), device, thresholds, note)


def _validation_thresholds(run: Path, checkpoint_name: str) -> tuple[dict[str, float] | None, str | None]:
    """The validation-Youden thresholds ``cxrflow evaluate`` recorded for this checkpoint, if any,
    and a one-line note when the run's evaluations belong to another checkpoint than it holds now.

    Every evaluation of a checkpoint chooses its thresholds on the validation split, so any current
    ``RUN/eval-<split>-<checkpoint>/metrics.json`` will do; findings without one are left out.
    """
    from cxrflow.evaluate import evaluation_status

    note = None
    for path in sorted(run.glob(f"eval-*-{checkpoint_name}/metrics.json")):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        stale = evaluation_status(path, metrics)
        if stale is not None:
            note = note or f"{path.parent}: {stale}; its thresholds are not used"
            continue
        recorded = metrics.get("threshold") or {}
        return {name: float(t) for name, t in recorded.items() if t is not None}, None
    return None, note


def predict_files(
    predictor: Predictor, paths: Sequence[str | os.PathLike], *, batch_size: int = 32
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Probabilities for each readable file, and one error per unreadable one, both in input order.

    Returns ``(predictions, errors)``: ``{"image": path, "probabilities": {finding: p}}`` and
    ``{"image": path, "error": reason}``.
    """
    from cxrflow.imaging import preprocess
    from cxrflow.inference import batch_logits

    predictions: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    pending: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.from_numpy(np.stack([img for _, img in pending])[:, None])
        logits = batch_logits(predictor.model, batch, predictor.mean, predictor.std, predictor.device)
        probs = torch.sigmoid(logits).numpy()
        for (name, _), row in zip(pending, probs):
            probabilities = dict(zip(predictor.label_names, map(float, row)))
            result: dict[str, Any] = {"image": name, "probabilities": probabilities}
            if predictor.thresholds is not None:
                result["positive"] = [
                    n for n in predictor.label_names if n in predictor.thresholds and probabilities[n] >= predictor.thresholds[n]
                ]
            predictions.append(result)
        pending.clear()

    for p in paths:
        name = str(p)
        path = Path(p)
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
        pending.append((name, gray))
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
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files (any size, gray, RGB, RGBA or 16-bit)")
    parser.add_argument("--run", default=None, help="run folder written by 'cxrflow train'")
    parser.add_argument(
        "--checkpoint", default=None, help="best_finetune, best_kt, last or a .pt path (default: best_finetune, else best_kt)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--store", default=None, help="the training store, only for checkpoints that lack pixel statistics")


def run(args: argparse.Namespace) -> int:
    if args.run is None and args.checkpoint is None:
        raise CxrflowError("give --run RUN (or --checkpoint FILE.pt)")
    predictor = load_predictor(args.run, args.checkpoint, device=args.device, store=args.store)
    predictions, errors = predict_files(predictor, args.images, batch_size=max(1, args.batch_size))
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
    if predictor.note:
        print(f"note: {predictor.note}", file=sys.stderr)
    for e in errors:
        print(f"error: {e['image']}: {e['error']}", file=sys.stderr)
    return 2 if errors else 0
