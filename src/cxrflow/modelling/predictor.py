"""A trained model ready to score image batches: :class:`Predictor` and its loading.

Everything a prediction needs (model, size, the pixel statistics recorded at training time, label
names) comes from the checkpoint, so prediction works after the store is gone. Thresholds and the
calibration come from a current evaluation of the same checkpoint only (:func:`cxrflow.runs.evaluation_status`).
``cxrflow predict`` (:mod:`cxrflow.results.predict`) and ensembles (:mod:`cxrflow.modelling.ensemble`,
whose :class:`~cxrflow.modelling.ensemble.EnsemblePredictor` has the same face) build on it.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxrflow import safeio
from cxrflow.errors import CxrflowError
from cxrflow.modelling.calibration import apply_temperatures, calibration_of, sigmoid
from cxrflow.modelling.inference import batch_logits, resolve_inference
from cxrflow.runs import check_metrics, evaluation_status, resolve_checkpoint


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
        z = batch_logits(self.model, images[self.size], self.mean, self.std, self.device, demographics)
        return z.numpy().astype(np.float64)

    def probabilities(self, images: dict[int, torch.Tensor], demographics: torch.Tensor | None = None) -> np.ndarray:
        """Probabilities ``float64[N, K]``: calibrated when the predictor has a calibration, else raw."""
        z = self.logits(images, demographics)
        return sigmoid(z) if self.calibration is None else apply_temperatures(z, *self.calibration)


def load_run_predictor(
    run: str | os.PathLike | None,
    checkpoint: str | None = None,
    *,
    device: str = "cpu",
    store: str | os.PathLike | None = None,
    raw: bool = False,
) -> Predictor:
    """Load a run's checkpoint (default: best_finetune, else best_kt), or the ``checkpoint`` file
    when ``run`` is None, for prediction; calibrated unless ``raw`` (when the run was evaluated)."""
    run_dir = Path(run) if run is not None else None
    evaluation, note = None, None
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
    inference = resolve_inference(path, store, device=device)
    if run_dir is not None:
        evaluation, note = _evaluation_record(run_dir, name, inference.label_names)
    thresholds, calibration = operating_scale(evaluation, inference.label_names, raw=raw)
    return Predictor(
        inference.model, inference.size, inference.pixel_mean, inference.pixel_std, inference.label_names, Path(path),
        inference.device, thresholds, calibration, note,
    )  # fmt: skip


def _evaluation_record(
    run: Path, checkpoint_name: str, label_names: Sequence[str] | None = None
) -> tuple[dict | None, str | None]:
    """The ``metrics.json`` of a current evaluation of this checkpoint, if any, and a one-line note
    when the run's evaluations belong to another checkpoint than it holds now.

    Every evaluation of a checkpoint chooses its thresholds and fits its temperatures on the
    validation split, so any current ``RUN/eval-<split>-<checkpoint>/metrics.json`` will do.
    """
    note, trained = None, []
    for path in sorted(run.glob(f"eval-*-{glob.escape(checkpoint_name)}/metrics.json")):
        try:
            metrics = check_metrics(safeio.read_json(path, "evaluation"), path)
        except (OSError, ValueError) as exc:  # said, not skipped silently: without it the output is raw
            note = note or f"{path}: unreadable ({_first_line(exc)}); its thresholds and calibration are not used"
            continue
        if metrics.get("alignment") is not None and not metrics.get("trained_on_store"):
            continue  # scored on another collection's store: not the run's operating points
        stale = evaluation_status(path, metrics)
        if stale is not None:
            note = note or f"{path.parent}: {stale}; its thresholds and calibration are not used"
            continue
        if metrics.get("trained_on_store"):  # one store of a run on several: its findings' operating points
            own = path.parent.name == f"eval-{metrics.get('split')}-{checkpoint_name}"  # the first store's
            trained.append((not own, metrics))
            continue
        if label_names is not None and list(metrics["label_names"]) != list(label_names):
            raise CxrflowError(  # the same checkpoint's evaluation: its findings can only differ in a damaged file
                f"its {len(metrics['label_names'])} findings are not its checkpoint's {len(label_names)} in the same "
                "order: the file is damaged; evaluate again with --overwrite",
                path,
            )
        return metrics, None
    return (_merged([m for _, m in sorted(trained, key=lambda t: t[0])]), None) if trained else (None, note)


def _merged(evaluations: Sequence[dict]) -> dict:
    """The operating points of a run trained on several stores: each finding's threshold and
    temperature from the first evaluation (its stores in the run's order) that scored it."""
    out: dict = {"threshold": {}, "threshold_calibrated": {}, "calibration": {"temperature": {}, "logit_offset": {}}}
    for metrics in evaluations:
        for key in ("threshold", "threshold_calibrated"):
            for name, value in (metrics.get(key) or {}).items():
                out[key].setdefault(name, value)
        for key in ("temperature", "logit_offset"):
            for name, value in ((metrics.get("calibration") or {}).get(key) or {}).items():
                out["calibration"][key].setdefault(name, value)
    return out


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def operating_scale(
    evaluation: dict | None, label_names: Sequence[str], *, raw: bool
) -> tuple[dict | None, tuple | None]:
    """(thresholds, calibration) from an evaluation's metrics: the calibrated ones unless ``raw``
    or the evaluation predates calibration; thresholds of findings without one are left out."""
    if evaluation is None:
        return None, None
    calibration = None if raw else calibration_of(evaluation.get("calibration"), label_names)
    key = "threshold" if calibration is None else "threshold_calibrated"
    recorded = evaluation.get(key) or {}
    return {name: float(t) for name, t in recorded.items() if t is not None}, calibration
