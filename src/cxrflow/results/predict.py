"""Finding probabilities for new image files from a trained run.

Images go through exactly the ETL's preprocessing (:func:`cxrflow.data.imaging.preprocess`: decode any
mode the ETL accepts to 8-bit gray, resize to the run's size) and the loader's normalisation
(:func:`cxrflow.data.loader.to_model_input` with the pixel mean and std recorded in the checkpoint at
training time), so a file gives the same input the model saw in training. Everything needed (model,
size, pixel statistics, label names) comes from the checkpoint, so prediction works after the store
is gone. Thresholds come from an evaluation of the same checkpoint only (checked by its hash).

Probabilities are calibrated by default: an evaluated run's per-finding temperatures (fitted on the
validation logits by ``cxrflow evaluate``) divide the logits, and the flagged findings use the
validation-Youden thresholds chosen on the same calibrated scale; ``--raw`` gives the model's own
sigmoid outputs and the thresholds chosen on them. ``--run`` may also name an ensemble folder
(``cxrflow ensemble``): every member scores the file and the ensemble combines them.

An unreadable file is reported as one ``error: <file>: <reason>`` line; the other files still get
their predictions and the exit status is 2.

A run that fuses demographics needs them: ``--age 63 --sex F --view AP`` for every file, or
``--metadata CSV`` with ``image,age,sex,view`` rows (the word ``unknown`` or an empty cell for a
value that is not known); they are encoded exactly as in training (:mod:`cxrflow.data.demographics`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cxrflow.atomic import json_safe
from cxrflow.data.demographics import FIELDS, encode, parse_age, parse_choice, read_metadata_csv
from cxrflow import safeio
from cxrflow.errors import CxrflowError
from cxrflow.names import printable
from cxrflow import options

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
    #: evaluate``) on the scale of the probabilities given, or None when the run has not been
    #: evaluated at this checkpoint.
    thresholds: dict[str, float] | None = None
    #: Per-finding (temperatures, logit offsets) ``float64[K]`` each (calibrated output, see
    #: :mod:`cxrflow.modelling.calibration`), or None (the raw sigmoid).
    calibration: tuple[np.ndarray, np.ndarray] | None = None
    #: Why an evaluation of the run was not used for thresholds (it belongs to another checkpoint).
    note: str | None = None

    @property
    def sizes(self) -> list[int]:
        """Input sizes this predictor needs each image at."""
        return [self.size]

    @property
    def uses_demographics(self) -> bool:
        return bool(getattr(self.model, "uses_demographics", False))

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    def logits(self, images: dict[int, torch.Tensor], demographics: torch.Tensor | None = None) -> np.ndarray:
        """Raw logits ``float64[N, K]`` of a uint8 batch ``[N, 1, S, S]`` given per size (and the
        encoded demographics ``[N, 3]`` a fused model needs)."""
        from cxrflow.modelling.inference import batch_logits

        z = batch_logits(self.model, images[self.size], self.mean, self.std, self.device, demographics)
        return z.numpy().astype(np.float64)

    def probabilities(self, images: dict[int, torch.Tensor], demographics: torch.Tensor | None = None) -> np.ndarray:
        """Probabilities ``float64[N, K]``: calibrated when the predictor has a calibration, else raw."""
        from cxrflow.modelling.calibration import apply_temperatures, sigmoid

        z = self.logits(images, demographics)
        return sigmoid(z) if self.calibration is None else apply_temperatures(z, *self.calibration)


def load_predictor(
    run: str | os.PathLike | None,
    checkpoint: str | None = None,
    *,
    device: str = "cpu",
    store: str | os.PathLike | None = None,
    raw: bool = False,
) -> Any:
    """Load a run's checkpoint (default: best_finetune, else best_kt) for prediction, calibrated
    unless ``raw`` (when the run was evaluated). An ensemble folder gives an
    :class:`~cxrflow.modelling.ensemble.EnsemblePredictor` with the same face."""
    from cxrflow.results.evaluate import METRICS_NAME, resolve_checkpoint
    from cxrflow.modelling.inference import resolve_device, training_pixel_stats
    from cxrflow.modelling.models import load_checkpoint

    run_dir = Path(run) if run is not None else None
    evaluation, note = None, None
    if run_dir is not None and not run_dir.is_dir():
        raise CxrflowError("no such run folder", run_dir)
    if run_dir is not None and (run_dir / METRICS_NAME).is_file():
        from cxrflow.modelling.ensemble import load_ensemble_predictor

        return load_ensemble_predictor(run_dir, device=device, raw=raw)
    if run_dir is None:
        if not checkpoint:
            raise CxrflowError("give --run or a --checkpoint file")
        path = Path(checkpoint)
        if not path.is_file():
            raise CxrflowError("no such checkpoint", path)
    else:
        name, path = resolve_checkpoint(run_dir, checkpoint)
        evaluation, note = _evaluation_record(run_dir, name)
    device = resolve_device(device)
    model, ckpt = load_checkpoint(path, map_location=device)
    config = dict(ckpt.get("config") or {})
    if store is not None:
        config["store"] = str(store)
    if "size" not in config:
        raise CxrflowError("checkpoint config has no 'size'", path)
    size = int(config["size"])
    mean, std = training_pixel_stats(config, size)
    label_names = list(ckpt["label_names"])
    thresholds, calibration = operating_scale(evaluation, label_names, raw=raw)
    return Predictor(model.eval(), size, mean, std, label_names, Path(path), device, thresholds, calibration, note)


def _evaluation_record(run: Path, checkpoint_name: str) -> tuple[dict | None, str | None]:
    """The ``metrics.json`` of a current evaluation of this checkpoint, if any, and a one-line note
    when the run's evaluations belong to another checkpoint than it holds now.

    Every evaluation of a checkpoint chooses its thresholds and fits its temperatures on the
    validation split, so any current ``RUN/eval-<split>-<checkpoint>/metrics.json`` will do.
    """
    from cxrflow.results.evaluate import check_metrics, evaluation_status

    note = None
    for path in sorted(run.glob(f"eval-*-{glob.escape(checkpoint_name)}/metrics.json")):
        try:
            metrics = check_metrics(safeio.read_json(path, "evaluation"), path)
        except (OSError, ValueError) as exc:  # said, not skipped silently: without it the output is raw
            note = note or f"{path}: unreadable ({_first_line(exc)}); its thresholds and calibration are not used"
            continue
        stale = evaluation_status(path, metrics)
        if stale is not None:
            note = note or f"{path.parent}: {stale}; its thresholds and calibration are not used"
            continue
        return metrics, None
    return None, note


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def operating_scale(evaluation: dict | None, label_names: Sequence[str], *, raw: bool) -> tuple[dict | None, tuple | None]:
    """(thresholds, calibration) from an evaluation's metrics: the calibrated ones unless ``raw``
    or the evaluation predates calibration; thresholds of findings without one are left out."""
    from cxrflow.modelling.calibration import calibration_of

    if evaluation is None:
        return None, None
    calibration = None if raw else calibration_of(evaluation.get("calibration"), label_names)
    key = "threshold" if calibration is None else "threshold_calibrated"
    recorded = evaluation.get(key) or {}
    return {name: float(t) for name, t in recorded.items() if t is not None}, calibration


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
    from cxrflow.data.imaging import preprocess

    predictions: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    pending: list[tuple[str, np.ndarray, Demographics | None]] = []

    def flush() -> None:
        if not pending:
            return
        batch = {s: torch.from_numpy(np.stack([img[s] for _, img, _ in pending])[:, None]) for s in predictor.sizes}
        demo = torch.from_numpy(encode([d for _, _, d in pending])) if predictor.uses_demographics else None
        probs = predictor.probabilities(batch, demo)
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
            gray = preprocess(path, predictor.sizes)
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
    width = max(len("image"), *(len(printable(r["image"])) for r in predictions))
    cols = [max(len(n), 5) for n in label_names]
    flagged = "positive" in predictions[0]
    header = f"{'image':<{width}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(label_names, cols))
    lines = [header + ("  positive at the validation threshold" if flagged else "")]
    for r in predictions:
        line = f"{printable(r['image']):<{width}}  " + "  ".join(f"{r['probabilities'][n]:>{w}.3f}" for n, w in zip(label_names, cols))
        if flagged:
            line += "  " + (", ".join(r["positive"]) or "none")
        lines.append(line)
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images", nargs="*", metavar="IMAGE",
        help="PNG, JPEG or DICOM files (any size, gray, RGB, RGBA or 16-bit); default: the images of --metadata",
    )
    parser.add_argument("--run", default=None, help="run folder written by 'cxrflow train', or an ensemble folder ('cxrflow ensemble')")
    parser.add_argument(
        "--checkpoint", default=None, help="best_finetune, best_kt, last or a .pt path (default: best_finetune, else best_kt)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--raw", action="store_true", help="the model's raw sigmoid outputs instead of calibrated probabilities (and thresholds on that scale)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument("--batch-size", type=options.positive_int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--store", default=None, help="the training store, only for checkpoints that lack pixel statistics")
    parser.add_argument(
        "--heatmaps", default=None, metavar="DIR",
        help="write a heatmap overlay PNG per image and flagged finding into DIR (paths in the JSON output)",
    )  # fmt: skip
    parser.add_argument("--heatmap-method", default=None, choices=["gradcam", "hirescam"], help="default: the model's own")
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
    predictor = load_predictor(args.run, args.checkpoint, device=args.device, store=args.store, raw=args.raw)
    if demographics is not None and not predictor.uses_demographics:
        print("note: this run does not use demographics; --age/--sex/--view/--metadata are ignored", file=sys.stderr)
    predictions, errors = predict_files(
        predictor, images, batch_size=max(1, args.batch_size), demographics=demographics
    )
    heatmap_method = None
    if args.heatmaps is not None:
        from cxrflow.results.overlays import write_prediction_heatmaps

        heatmap_method = write_prediction_heatmaps(predictor, predictions, args.heatmaps, method=args.heatmap_method)
    if args.json:
        print(
            json.dumps(
                json_safe({
                    "checkpoint": str(predictor.checkpoint),
                    "size": predictor.size,
                    "calibrated": predictor.calibrated,
                    "label_names": predictor.label_names,
                    "thresholds": predictor.thresholds,
                    "predictions": predictions,
                    "errors": errors,
                    **({"heatmap_method": heatmap_method} if heatmap_method else {}),
                }),
                indent=2,
            )
        )
    elif predictions:
        print(format_table(predictions, predictor.label_names))
        if heatmap_method:
            print(f"wrote {sum(len(p['heatmaps']) for p in predictions)} {heatmap_method} heatmaps to {args.heatmaps}")
    if getattr(predictor, "note", None):  # an ensemble checks its members when it loads
        print(f"note: {predictor.note}", file=sys.stderr)
    for e in errors:
        print(f"error: {printable(e['image'])}: {printable(e['error'])}", file=sys.stderr)
    return 2 if errors else 0
