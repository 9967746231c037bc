"""The Python API for notebooks: ``cxrflow.load_model`` and ``cxrflow.open_store``.

A thin, typed face over the functions the command line uses, never a second implementation:
:func:`load_model` is ``cxrflow predict``'s :func:`~cxrflow.results.predict.load_predictor` (the
same checkpoint choice, pixel statistics, calibration and thresholds), :meth:`Model.predict` is its
:func:`~cxrflow.results.predict.predict_files` as a DataFrame, :meth:`Model.heatmaps` is the
``--heatmaps`` path of :mod:`cxrflow.results.overlays`, and :func:`open_store` reads the manifest
with :func:`cxrflow.data.store.read_manifest` and streams batches with
:func:`cxrflow.data.loader.make_loader`. User mistakes raise :class:`cxrflow.errors.CxrflowError`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cxrflow.data.demographics import parse_age, parse_choice
from cxrflow.data.store import SPLITS, format_manifest, pixel_stats, read_manifest
from cxrflow.errors import CxrflowError
from cxrflow.results.predict import Demographics, load_predictor, predict_files

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from cxrflow.data.loader import StoreLoader

PathLike = str | os.PathLike
#: The file that makes a folder a training run (written by ``cxrflow train``).
RUN_CONFIG = "config.json"
#: Age, sex and view of one image as a user writes them: ``(63, "F", "PA")``; None or "unknown" where not known.
DemographicsInput = tuple[Any, Any, Any]


@dataclass
class Heatmap:
    """One finding's class-activation heatmap on one image."""

    image: str
    finding: str
    #: the finding's probability (calibrated or raw, as :meth:`Model.predict` gives it)
    probability: float
    #: ``gradcam`` or ``hirescam``
    method: str
    #: ``float32[S, S]`` in [0, 1] over the model's input (the image padded to a square, resized to S)
    map: np.ndarray = field(repr=False)
    #: the ``predict`` result the heatmap belongs to (for the overlay's title)
    prediction: dict = field(repr=False)

    def on_original(self) -> np.ndarray:
        """The map on the original image's pixel grid, ``float32[height, width]``."""
        from cxrflow.data.imaging import load_gray
        from cxrflow.modelling.heatmaps import to_original

        height, width = load_gray(self.image)[0].shape
        return to_original(self.map, width, height)

    def figure(self) -> Figure:
        """The overlay ``cxrflow predict --heatmaps`` saves: the original image, the map over it, a
        colour bar; returned, not shown or saved."""
        from cxrflow.results.overlays import prediction_overlay

        return prediction_overlay(self.prediction, self.finding, self.map, self.method)


class Model:
    """A trained run loaded for scoring image files; see :func:`load_model`."""

    def __init__(self, predictor: Any):
        #: the :class:`~cxrflow.results.predict.Predictor` (or ensemble predictor) ``cxrflow predict`` uses
        self.predictor = predictor

    @property
    def findings(self) -> list[str]:
        """Finding names, in the order of the model's outputs."""
        return list(self.predictor.label_names)

    @property
    def checkpoint(self) -> Path:
        return Path(self.predictor.checkpoint)

    @property
    def calibrated(self) -> bool:
        """True when probabilities are temperature-scaled by the run's evaluation (else raw sigmoid)."""
        return bool(self.predictor.calibrated)

    @property
    def thresholds(self) -> dict[str, float] | None:
        """Per-finding decision thresholds of the run's evaluation (validation Youden's J, on the scale
        of the probabilities given), or None when the checkpoint was not evaluated."""
        return None if self.predictor.thresholds is None else dict(self.predictor.thresholds)

    @property
    def note(self) -> str | None:
        """Why an evaluation of the run was not used (it belongs to another checkpoint), if so."""
        return getattr(self.predictor, "note", None)

    def describe(self) -> str:
        """One line: the checkpoint, the probability scale and where the calls come from."""
        scale = "calibrated" if self.calibrated else "raw"
        calls = ("calls at the evaluation's validation thresholds" if self.thresholds is not None
                 else "no calls (not evaluated: run 'cxrflow evaluate' for thresholds and calibration)")  # fmt: skip
        return f"{self.checkpoint}: {len(self.findings)} findings, {scale} probabilities, {calls}"

    def __repr__(self) -> str:
        return f"<cxrflow Model {self.describe()}>"

    def predict(
        self,
        images: PathLike | Sequence[PathLike],
        *,
        demographics: DemographicsInput | Mapping[str, DemographicsInput] | None = None,
        batch_size: int = 32,
        errors: Literal["raise", "skip"] = "raise",
    ) -> pd.DataFrame:
        """Probabilities and calls for image files (PNG, JPEG, DICOM), one row per image.

        Columns are two levels: ``("probability", finding)`` floats and, when the run was evaluated,
        ``("call", finding)`` booleans (probability at or above the finding's validation threshold; NA
        for a finding without one). The column levels are named after the scale (``calibrated`` or
        ``raw``) and ``table.attrs`` says the same (``scale``, ``thresholds``, ``calls``,
        ``checkpoint``, ``errors``). ``demographics``: ``(age, sex, view)`` for every image, or a
        mapping from image to it, for a run that fuses them. ``errors="skip"`` leaves unreadable
        files out (listed in ``attrs["errors"]``) instead of raising.
        """
        import pandas as pd

        paths = [str(images)] if isinstance(images, (str, os.PathLike)) else [str(p) for p in images]
        predictions, failed = self._predictions(paths, demographics, batch_size, errors)
        names, thresholds = self.findings, self.thresholds
        columns = [("probability", n) for n in names] + ([("call", n) for n in names] if thresholds is not None else [])
        rows = []
        for p in predictions:
            row: list[Any] = [p["probabilities"][n] for n in names]
            if thresholds is not None:
                row += [(n in p["positive"]) if n in thresholds else pd.NA for n in names]
            rows.append(row)
        table = pd.DataFrame(
            rows,
            columns=pd.MultiIndex.from_tuples(columns),
            index=pd.Index([p["image"] for p in predictions], name="image"),
        )
        table = table.astype({c: "float64" if c[0] == "probability" else "boolean" for c in columns})
        table.columns.names = ["calibrated" if self.calibrated else "raw", "finding"]
        table.attrs.update(self._attrs(), errors=failed)
        return table

    def _attrs(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "scale": "calibrated" if self.calibrated else "raw",
            "thresholds": self.thresholds,
            "calls": None if self.thresholds is None else "probability >= the evaluation's validation-Youden threshold",
        }

    def _predictions(
        self, paths: list[str], demographics: Any, batch_size: int, errors: str
    ) -> tuple[list[dict], list[dict]]:
        """``predict_files``' (predictions, errors); with ``errors="raise"`` an unreadable file raises."""
        if errors not in ("raise", "skip"):
            raise CxrflowError(f"errors must be 'raise' or 'skip', got {errors!r}")
        if not paths:
            raise CxrflowError("give at least one image file")
        if demographics is not None and not self.predictor.uses_demographics:
            warnings.warn("this run does not use demographics; they are ignored", stacklevel=3)
        predictions, failed = predict_files(self.predictor, paths, batch_size=max(1, int(batch_size)),
                                            demographics=_demographics(paths, demographics))  # fmt: skip
        if failed and errors == "raise":
            first = failed[0]
            raise CxrflowError(f"{len(failed)} of {len(paths)} images could not be scored; the first: {first['error']} "
                               "(errors='skip' leaves them out)", first["image"])  # fmt: skip
        return predictions, failed

    def heatmaps(
        self,
        images: PathLike | Sequence[PathLike],
        finding: str | Sequence[str] | None = None,
        *,
        method: str | None = None,
        demographics: DemographicsInput | Mapping[str, DemographicsInput] | None = None,
    ) -> list[Heatmap]:
        """Class-activation heatmaps, in image order, then finding order.

        ``finding``: a name or names; None gives the findings ``cxrflow predict --heatmaps`` draws
        (called positive, or probability >= 0.5 when the run was not evaluated). ``method``:
        ``gradcam`` or ``hirescam`` (default: the one the model's registry entry names).
        Each :class:`Heatmap` has the array (``.map``, ``.on_original()``) and ``.figure()``.
        """
        from cxrflow.modelling.heatmaps import cam_method
        from cxrflow.results.overlays import check_heatmap_predictor, flagged_findings, prediction_heatmaps

        check_heatmap_predictor(self.predictor)
        wanted = None if finding is None else [finding] if isinstance(finding, str) else list(finding)
        unknown = [n for n in wanted or [] if n not in self.findings]
        if unknown:
            raise CxrflowError(f"unknown finding {unknown[0]!r}; this model has {', '.join(self.findings)}")
        method = cam_method(self.predictor.model, method)
        paths = [str(images)] if isinstance(images, (str, os.PathLike)) else [str(p) for p in images]
        out: list[Heatmap] = []
        for prediction in self._predictions(paths, demographics, 32, "raise")[0]:
            names = flagged_findings(prediction) if wanted is None else wanted
            if not names:
                continue
            maps = prediction_heatmaps(self.predictor, prediction, names, method)
            out += [Heatmap(prediction["image"], n, prediction["probabilities"][n], method, m, prediction)
                    for n, m in zip(names, maps)]  # fmt: skip
        return out


def _demographics(paths: list[str], given: Any) -> dict[str, Demographics] | None:
    """``predict_files``' demographics from one (age, sex, view) for all images or a mapping per image."""
    if given is None:
        return None

    def parsed(entry: Any, where: str) -> Demographics:
        if not isinstance(entry, (tuple, list)) or len(entry) != 3:
            raise CxrflowError(f"demographics of {where} must be (age, sex, view), got {entry!r}")
        age, sex, view = entry
        return (parse_age(age, "age"), parse_choice(sex, "sex", "sex"), parse_choice(view, "view", "view"))

    if isinstance(given, Mapping):
        return {str(k): parsed(v, str(k)) for k, v in given.items()}
    entry = parsed(given, "every image")
    return {p: entry for p in paths}


def load_model(
    path: PathLike,
    *,
    checkpoint: str | None = None,
    device: str = "cpu",
    raw: bool = False,
    store: PathLike | None = None,
) -> Model:
    """A trained model for scoring files, loaded exactly as ``cxrflow predict`` loads it.

    ``path``: a run folder (its best checkpoint: ``best_finetune``, else ``best_kt``; ``checkpoint``
    picks another: ``best_kt``, ``last`` or a file), an ensemble folder, or a ``.pt`` checkpoint file
    (inside its run folder, the run's evaluations of it count). Probabilities are calibrated and calls
    made at the thresholds of the run's current evaluation of that checkpoint when there is one (``raw=True``: the raw sigmoid, thresholds on that scale); a run
    never evaluated gives raw probabilities and no calls. ``store``: the training store, only for
    old checkpoints without pixel statistics. ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
    An evaluation that belongs to another checkpoint than the run holds now is not used, with a warning.
    """
    source = Path(path)
    if source.is_file() and (source.parent / RUN_CONFIG).is_file():  # a run's own checkpoint: its evaluations apply
        predictor = load_predictor(source.parent, str(source), device=device, store=store, raw=raw)
    elif source.is_file():
        predictor = load_predictor(None, str(source), device=device, store=store, raw=raw)
    elif source.is_dir():
        predictor = load_predictor(source, checkpoint, device=device, store=store, raw=raw)
    else:
        raise CxrflowError("no such run folder or checkpoint file", source)
    if getattr(predictor, "note", None):  # what cxrflow predict prints as a note: its evaluation was not used
        warnings.warn(predictor.note, stacklevel=2)
    return Model(predictor)


class Store:
    """A cxrflow Parquet store written by ``cxrflow etl``; see :func:`open_store`."""

    def __init__(self, path: PathLike, manifest: dict):
        self.path = Path(path)
        #: the store's ``_manifest.json`` (checked)
        self.manifest = manifest

    @property
    def findings(self) -> list[str]:
        """Finding names in the order of every label vector."""
        return list(self.manifest["label_names"])

    @property
    def sizes(self) -> list[int]:
        """Image sizes (pixels per side) the store holds."""
        return [int(s) for s in self.manifest["sizes"]]

    @property
    def splits(self) -> list[str]:
        """Splits present at any size, in train, val, test order."""
        present = {split for per_split in self.manifest["rows"].values() for split in per_split}
        return [s for s in SPLITS if s in present]

    @property
    def rows(self) -> dict[int, dict[str, int]]:
        """Images per size and split."""
        return {int(size): dict(per_split) for size, per_split in self.manifest["rows"].items()}

    def pixel_stats(self, size: int) -> tuple[float, float]:
        """(mean, std) of the train pixels at ``size`` on the 0..1 scale (the model's normalisation)."""
        return pixel_stats(self.manifest, size)

    def describe(self) -> str:
        """The summary ``cxrflow store`` prints."""
        return format_manifest(self.manifest)

    def __repr__(self) -> str:
        return f"<cxrflow Store {self.path}: {len(self.findings)} findings, sizes {self.sizes}, splits {self.splits}>"

    def loader(
        self,
        size: int,
        split: str = "train",
        batch_size: int = 32,
        *,
        shuffle: bool | None = None,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
        uncertain: str = "ignore",
    ) -> StoreLoader:
        """Batches of one (size, split) partition, the loader training uses (:func:`~cxrflow.data.loader.make_loader`).

        A batch is a dict: ``image`` uint8 ``[N, 1, S, S]``, ``labels`` float32 ``[N, K]``,
        ``known`` float32 ``[N, K]``, ``demographics`` float32 ``[N, 3]``, ``patient_id``, ``image_id``.
        ``shuffle`` defaults to True for the train split only; call ``set_epoch`` between epochs.
        """
        from cxrflow.data.loader import make_loader

        return make_loader(self.path, size, split, batch_size=batch_size, shuffle=(split == "train") if shuffle is None else shuffle,
                           seed=seed, num_workers=num_workers, drop_last=drop_last, uncertain=uncertain)  # fmt: skip


def open_store(path: PathLike) -> Store:
    """Open a store folder written by ``cxrflow etl``; a missing, incomplete or too new store is a
    CxrflowError saying so."""
    return Store(path, read_manifest(path))
