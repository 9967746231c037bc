"""Scoring a table of images: the one core behind the exported MLflow model and Spark batch scoring.

A deployed model answers a table, not files: a ``pandas`` frame with a string column ``image``
(base64-encoded PNG, JPEG or DICOM bytes) and, for a run that fuses demographics, ``age``, ``sex``
and ``view``. :func:`score_frame` turns it into one row per image:

- ``prob_<finding>`` float: calibrated when the run was evaluated (temperatures from the
  evaluation's ``metrics.json``), the raw sigmoid otherwise, exactly as ``cxrflow predict`` gives;
- ``positive_<finding>`` bool: ``prob >= threshold`` at the evaluation's operating thresholds
  (validation Youden), null where a finding has no threshold (a run not evaluated has none);
- ``error`` str: null, or why that row's image could not be scored (its other columns are null).

A bad image never fails the batch. Images are decoded by :mod:`cxrflow.data.imaging` (the ETL's own
decode, gray, pad-to-square and resize) and normalised, scored and calibrated by the same
:class:`~cxrflow.results.predict.Predictor` as ``cxrflow predict``; nothing here preprocesses twice.
An ensemble's predictor (:class:`~cxrflow.modelling.ensemble.EnsemblePredictor`) has the same face:
each image is decoded once and resized to every size its members take.

Everything a predictor needs besides its weights fits in one JSON object (:func:`predictor_spec`),
which travels inside the exported model and to Spark executors; :func:`predictor_from_spec`
rebuilds the predictor from it and a slim checkpoint (:func:`save_slim_checkpoint`).
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrflow.errors import CxrflowError
from cxrflow.results.predict import Predictor

#: Largest decoded image a request may carry (bytes): an uncompressed 16-bit 4300 x 4300 DICOM is
#: 37 MB, and a body far beyond that is refused per row before anything is decoded.
MAX_IMAGE_BYTES = 40 * 1024 * 1024
#: Input columns: the image (required) and the demographics (used by fused runs only).
IMAGE_COLUMN = "image"
DEMOGRAPHIC_COLUMNS = ("age", "sex", "view")
ERROR_COLUMN = "error"
SPEC_VERSION = 1


def output_columns(label_names: Sequence[str]) -> list[str]:
    """The scored table's columns, in order."""
    return [f"prob_{n}" for n in label_names] + [f"positive_{n}" for n in label_names] + [ERROR_COLUMN]


def predictor_spec(predictor: Predictor) -> dict[str, Any]:
    """The JSON-able description of what surrounds the weights: size, pixel statistics, findings,
    thresholds and calibration."""
    calibration = predictor.calibration
    return {
        "version": SPEC_VERSION,
        "size": int(predictor.size),
        "pixel_mean": float(predictor.mean),
        "pixel_std": float(predictor.std),
        "label_names": list(predictor.label_names),
        "calibrated": calibration is not None,
        "temperature": None if calibration is None else [float(t) for t in calibration[0]],
        "logit_offset": None if calibration is None else [float(o) for o in calibration[1]],
        "thresholds": None if predictor.thresholds is None else dict(predictor.thresholds),
        "uses_demographics": bool(predictor.uses_demographics),
        "max_image_bytes": MAX_IMAGE_BYTES,
    }


def save_slim_checkpoint(predictor: Predictor, ckpt: dict, path: str | os.PathLike) -> None:
    """Write the weights, config (with the pixel statistics in use) and findings only: what
    :func:`~cxrflow.modelling.models.load_checkpoint` needs, without the optimizer's state."""
    import torch

    from cxrflow.atomic import atomic_path

    config = dict(ckpt.get("config") or {})
    config.update(pixel_mean=float(predictor.mean), pixel_std=float(predictor.std), size=int(predictor.size))
    slim = {
        "model": {k: v.detach().cpu() for k, v in predictor.model.state_dict().items()},
        "config": config,
        "label_names": list(predictor.label_names),
        **{k: ckpt[k] for k in ("stage", "epoch") if k in ckpt},
    }
    with atomic_path(path) as tmp:
        torch.save(slim, tmp)


def predictor_from_spec(checkpoint: str | os.PathLike, spec: dict[str, Any]) -> Predictor:
    """A CPU predictor from a slim checkpoint and its :func:`predictor_spec`."""
    import torch

    from cxrflow.modelling.models import load_checkpoint

    if spec.get("version") != SPEC_VERSION:
        raise CxrflowError(f"scoring spec version {spec.get('version')!r} is not {SPEC_VERSION}", checkpoint)
    model, ckpt = load_checkpoint(checkpoint, map_location="cpu")
    if list(ckpt["label_names"]) != list(spec["label_names"]):
        raise CxrflowError("the checkpoint's findings are not the spec's", checkpoint)
    calibration = None
    if spec.get("calibrated"):
        calibration = (np.asarray(spec["temperature"], np.float64), np.asarray(spec["logit_offset"], np.float64))
    return Predictor(
        model.eval(), int(spec["size"]), float(spec["pixel_mean"]), float(spec["pixel_std"]), list(spec["label_names"]),
        Path(checkpoint), torch.device("cpu"), spec.get("thresholds"), calibration,
    )  # fmt: skip


def decode_base64(value: Any, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The file bytes of one ``image`` cell (base64 text, or bytes as they are); CxrflowError naming
    what is wrong with it."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("data:") and "," in text[:100]:  # a data URL: data:image/png;base64,....
            text = text.split(",", 1)[1]
        if len(text) * 3 // 4 > max_bytes + 3:
            raise CxrflowError(
                f"image of about {len(text) * 3 // 4 / 2**20:.1f} MB is over the limit of {max_bytes / 2**20:.0f} MB"
            )
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CxrflowError(f"'image' is not base64-encoded file bytes ({exc})") from None
    elif value is None or (isinstance(value, float) and np.isnan(value)):
        raise CxrflowError("'image' is empty (null)")
    else:
        raise CxrflowError(f"'image' must be a base64 string, got {type(value).__name__}")
    if len(data) > max_bytes:
        raise CxrflowError(f"image of {len(data) / 2**20:.1f} MB is over the limit of {max_bytes / 2**20:.0f} MB")
    return data


def decode_images(
    values: Sequence[Any], sizes: int | Sequence[int], max_bytes: int = MAX_IMAGE_BYTES
) -> tuple[list[dict[int, np.ndarray] | None], list[str | None]]:
    """Each cell decoded once by the ETL's preprocessing to uint8 ``[S, S]`` at every size in
    ``sizes`` (an ensemble's members may take different sizes; None where it fails), and the reason
    per failed cell (None where it worked)."""
    from cxrflow.data.imaging import preprocess

    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    pixels: list[dict[int, np.ndarray] | None] = []
    errors: list[str | None] = []
    for value in values:
        try:
            pixels.append(preprocess(decode_base64(value, max_bytes), sizes))
            errors.append(None)
        except CxrflowError as exc:
            pixels.append(None)
            errors.append(exc.message)
        except (OSError, ValueError, MemoryError) as exc:  # a decoder failure on user data is that row's error
            pixels.append(None)
            errors.append(f"cannot decode: {exc}"[:300])
    return pixels, errors


def encode_demographics(
    age: Sequence[Any] | None, sex: Sequence[Any] | None, view: Sequence[Any] | None, n: int
) -> np.ndarray:
    """float32 ``[n, 3]`` by the training encoding (:func:`cxrflow.data.demographics.encode_arrow`);
    a missing column is unknown for every row."""
    import pyarrow as pa

    from cxrflow.data.demographics import encode_arrow

    def column(values: Sequence[Any] | None, kind: pa.DataType) -> pa.Array:
        if values is None:
            return pa.nulls(n, kind)
        clean = [None if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in values]
        if kind == pa.float64():
            clean = [None if v is None else _number(v) for v in clean]
        else:
            clean = [None if v is None else str(v) for v in clean]
        return pa.array(clean, kind)

    return encode_arrow(column(age, pa.float64()), column(sex, pa.string()), column(view, pa.string()))


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # "unknown", "", "?": not known, as on the command line


def score_pixels(
    predictor: Any, pixels: np.ndarray | dict[int, np.ndarray], demographics: np.ndarray | None, batch_size: int = 64
) -> np.ndarray:
    """Probabilities ``float64[N, K]`` of uint8 ``[N, S, S]`` images (calibrated when the predictor
    is); ``pixels`` is one array at the predictor's size, or one per size it needs (an ensemble's)."""
    import torch

    by_size = pixels if isinstance(pixels, dict) else {predictor.size: pixels}
    n = len(next(iter(by_size.values())))
    out = []
    for start in range(0, n, batch_size):
        images = {
            s: torch.from_numpy(np.ascontiguousarray(p[start : start + batch_size])[:, None])
            for s, p in by_size.items()
        }
        demo = None
        if predictor.uses_demographics:
            demo = torch.from_numpy(np.asarray(demographics[start : start + batch_size], np.float32))
        out.append(predictor.probabilities(images, demo))
    k = len(predictor.label_names)
    return np.concatenate(out) if out else np.zeros((0, k), np.float64)


def result_columns(
    label_names: Sequence[str],
    thresholds: dict[str, float] | None,
    probs: np.ndarray,
    ok: np.ndarray,
    errors: Sequence[str | None],
) -> dict[str, Any]:
    """The scored columns for N rows: ``probs`` ``[N, K]`` holds the rows where ``ok``; the others
    are null and carry their error. Floats as float64 with NaN for null, booleans as lists with None."""
    n = len(ok)
    full = np.full((n, len(label_names)), np.nan)
    full[ok] = probs
    cols: dict[str, Any] = {}
    for j, name in enumerate(label_names):
        cols[f"prob_{name}"] = full[:, j]
    for j, name in enumerate(label_names):
        t = None if thresholds is None else thresholds.get(name)
        cols[f"positive_{name}"] = [None if t is None or not ok[i] else bool(full[i, j] >= t) for i in range(n)]
    cols[ERROR_COLUMN] = [None if ok[i] else str(errors[i]) for i in range(n)]
    return cols


def score_frame(predictor: Any, frame: Any, max_image_bytes: int = MAX_IMAGE_BYTES) -> Any:
    """The scored ``pandas`` frame (see the module docstring) of an input frame, one row per row."""
    import pandas as pd

    if IMAGE_COLUMN not in frame.columns:
        raise CxrflowError(
            f"the input has no {IMAGE_COLUMN!r} column (it has: {', '.join(map(str, frame.columns)) or 'none'}); "
            f"give base64-encoded image bytes in {IMAGE_COLUMN!r}"
        )
    sizes = list(predictor.sizes)
    pixels, errors = decode_images(list(frame[IMAGE_COLUMN]), sizes, max_image_bytes)
    ok = np.array([p is not None for p in pixels], dtype=bool)
    demographics = None
    if predictor.uses_demographics:
        get = {c: (list(frame[c]) if c in frame.columns else None) for c in DEMOGRAPHIC_COLUMNS}
        demographics = encode_demographics(get["age"], get["sex"], get["view"], len(frame))[ok]
    good = {
        s: np.stack([p[s] for p in pixels if p is not None]) if ok.any() else np.zeros((0, s, s), np.uint8)
        for s in sizes
    }
    probs = score_pixels(predictor, good, demographics)
    cols = result_columns(predictor.label_names, predictor.thresholds, probs, ok, errors)
    out = pd.DataFrame(index=frame.index)
    for name, values in cols.items():
        if name.startswith("prob_"):
            out[name] = pd.array(values, dtype="Float64")
            out.loc[~ok, name] = pd.NA
        elif name.startswith("positive_"):
            out[name] = pd.array(values, dtype="boolean")
        else:
            out[name] = pd.array(values, dtype="string")
    return out
