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

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cxrflow.data.demographics import FIELDS, encode
from cxrflow.errors import CxrflowError
from cxrflow.modelling.predictor import Predictor, load_run_predictor
from cxrflow.runs import METRICS_NAME

if TYPE_CHECKING:
    from cxrflow.modelling.ensemble import EnsemblePredictor

#: (age, sex, view) of one image; None for a value that is not known.
Demographics = tuple[float | None, str | None, str | None]


def load_predictor(
    run: str | os.PathLike | None,
    checkpoint: str | None = None,
    *,
    device: str = "cpu",
    store: str | os.PathLike | None = None,
    raw: bool = False,
) -> Predictor | EnsemblePredictor:
    """Load a run's checkpoint (default: best_finetune, else best_kt) for prediction, calibrated
    unless ``raw`` (when the run was evaluated). An ensemble folder gives an
    :class:`~cxrflow.modelling.ensemble.EnsemblePredictor` with the same face."""
    run_dir = Path(run) if run is not None else None
    if run_dir is not None and not run_dir.is_dir():
        raise CxrflowError("no such run folder", run_dir)
    if run_dir is not None and (run_dir / METRICS_NAME).is_file():
        from cxrflow.modelling.ensemble import load_ensemble_predictor

        return load_ensemble_predictor(run_dir, device=device, raw=raw)
    return load_run_predictor(run_dir, checkpoint, device=device, store=store, raw=raw)


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
                    n
                    for n in predictor.label_names
                    if n in predictor.thresholds and probabilities[n] >= predictor.thresholds[n]
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
