"""The cases of a report: per finding, the test images a model is most wrong and most sure about.

:func:`select_cases` is the pure core (arrays in, row indices out): the top false positives
(negatives with the highest probability), the top false negatives (positives with the lowest) and
the most confident positives. :func:`read_pixels` fetches the chosen images from the store in one
pass per thumbnail set (image ids first, then only the row groups that hold a wanted image), and
:func:`case_set` puts both together for one evaluation, with a heatmap overlay per image where the
run has localization output and a heatmap function is available.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrflow import safeio
from cxrflow.results.embed import array_uri

#: (key, title, what it means) of each kind of case, in page order.
KINDS = (
    ("fp", "Top false positives", "called positive at the threshold without the label, highest probability first"),
    (
        "fn",
        "Top false negatives",
        "labelled with the finding but not called at the threshold, lowest probability first",
    ),
    ("tp", "Most confident positives", "labelled with the finding, highest probability"),
)
#: The same without an operating threshold: nothing is "called", so the images are only ranked.
RANKED_KINDS = (
    ("fp", "Highest-scored negatives", "no label for the finding, highest probability (no threshold to call them)"),
    ("fn", "Lowest-scored positives", "labelled with the finding, lowest probability (no threshold to call them)"),
    KINDS[2],
)
_NONE = {"fp": "no false positives", "fn": "no false negatives", "tp": "no positives"}
#: Longest side of a thumbnail, in pixels.
THUMB_SIDE = 128

HeatmapFn = Callable[..., np.ndarray]


def select_cases(
    probs: np.ndarray,
    labels: np.ndarray,
    n: int,
    known: np.ndarray | None = None,
    thresholds: Sequence[float | None] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Per finding, row indices of its top ``n`` false positives, false negatives and confident positives.

    With ``thresholds`` (one per finding, None or NaN: none), false positives are the negatives called
    positive (``prob >= threshold``) and false negatives the positives not called, so there may be
    fewer than ``n`` or none; without a threshold they are the highest-scored negatives and the
    lowest-scored positives. Rows whose label is unknown for a finding (``known == 0``) are left out
    of that finding's cases. Ties keep the rows' order.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    result = []
    for j in range(probs.shape[1]):
        usable = np.ones(len(probs), bool) if known is None else np.asarray(known[:, j]).astype(bool)
        pos = np.flatnonzero(usable & (labels[:, j] > 0.5))
        neg = np.flatnonzero(usable & (labels[:, j] <= 0.5))
        t = None if thresholds is None else thresholds[j]
        if t is not None and not np.isnan(t):
            neg, pos_missed = neg[probs[neg, j] >= t], pos[probs[pos, j] < t]
        else:
            pos_missed = pos
        result.append(
            {
                "fp": neg[np.argsort(-probs[neg, j], kind="stable")[:n]],
                "fn": pos_missed[np.argsort(probs[pos_missed, j], kind="stable")[:n]],
                "tp": pos[np.argsort(-probs[pos, j], kind="stable")[:n]],
            }
        )
    return result


def read_pixels(partition: str | os.PathLike, size: int, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """The ``[size, size]`` uint8 images of ``image_ids`` found in one store partition (absent ids are left out).

    Reads the ``image_id`` column of every file, then the pixels of only those row groups that hold a
    wanted image: one pass over the partition for the whole set.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    wanted = set(image_ids)
    value_set = _string_array(wanted)
    found: dict[str, np.ndarray] = {}
    for file in sorted(Path(partition).glob("*.parquet")):
        pf = pq.ParquetFile(safeio.regular_file(file, "store part"))
        for rg in range(pf.num_row_groups):
            ids = pf.read_row_group(rg, columns=["image_id"]).column("image_id")
            hit = pc.is_in(ids, value_set=value_set)
            if not pc.any(hit).as_py():
                continue
            table = pf.read_row_group(rg, columns=["image_id", "pixels"]).filter(hit)
            for image_id, pixels in zip(table.column("image_id").to_pylist(), table.column("pixels").to_pylist()):
                found[image_id] = np.frombuffer(pixels, np.uint8).reshape(size, size)
        if len(found) == len(wanted):
            break
    return found


def _string_array(values: set[str]):
    import pyarrow as pa

    return pa.array(sorted(values), pa.string())


def thumbnail_size(sizes: Sequence[int], model_size: int, need_model_input: bool) -> int:
    """The store size to read thumbnails from: the model's own when heatmaps need it, else the
    smallest size at least :data:`THUMB_SIDE` (or the largest there is)."""
    if need_model_input:
        return int(model_size)
    sizes = sorted(int(s) for s in sizes)
    return next((s for s in sizes if s >= THUMB_SIDE), sizes[-1] if sizes else int(model_size))


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """RGB uint8 image: the gray X-ray with ``heat`` (0..1) in viridis (colour-blind safe) on top."""
    from matplotlib import colormaps

    gray = np.repeat(image[..., None].astype(np.float32) / 255.0, 3, axis=2)
    h = np.clip(np.nan_to_num(np.asarray(heat, np.float32)), 0.0, 1.0)
    colour = colormaps["viridis"](h)[..., :3].astype(np.float32)
    weight = (alpha * h)[..., None]
    return np.clip(255.0 * ((1 - weight) * gray + weight * colour), 0, 255).astype(np.uint8)


def case_set(
    predictions: dict[str, Any],
    label_names: Sequence[str],
    n: int,
    *,
    thresholds: dict[str, float | None] | None = None,
    read: Callable[[list[str]], tuple[dict[str, np.ndarray], str | None]] | None = None,
    heatmaps: Callable[[np.ndarray, int], np.ndarray] | None = None,
) -> dict[str, Any]:
    """The cases of one evaluation, ready for the page.

    ``predictions``: ``image_id`` (list), ``probs`` and ``labels`` ``[N, K]``, optional ``known``.
    ``read(image_ids) -> (pixels by id, note)`` fetches the images (None: no thumbnails);
    ``heatmaps(image, finding_index) -> [S, S]`` draws an overlay (None: no overlays).
    Returns ``{"findings": [...], "note": str | None, "overlays": bool}``.
    """
    probs = np.asarray(predictions["probs"], dtype=np.float64)
    labels = np.asarray(predictions["labels"])
    ids = list(predictions["image_id"])
    per_finding = [(thresholds or {}).get(name) for name in label_names]
    chosen = select_cases(probs, labels, n, predictions.get("known"), per_finding)
    rows = sorted({int(i) for per in chosen for idx in per.values() for i in idx})
    pixels, note = read([ids[i] for i in rows]) if read is not None else ({}, None)
    findings = []
    for j, name in enumerate(label_names):
        threshold = (thresholds or {}).get(name)
        kinds = []
        for key, title, meaning in KINDS if threshold is not None else RANKED_KINDS:
            items = []
            for i in chosen[j][key]:
                image_id = ids[int(i)]
                positive = [label_names[k] for k in np.flatnonzero(labels[int(i)] > 0.5)]
                item = {
                    "image_id": image_id,
                    "prob": float(probs[int(i), j]),
                    "called": None if threshold is None else bool(probs[int(i), j] >= threshold),
                    "labels": positive,
                }
                image = pixels.get(image_id)
                if image is not None:
                    item["uri"] = array_uri(image, THUMB_SIDE)
                    item["alt"] = (
                        f"{image_id}: probability of {name} {item['prob']:.3f}; labels: {', '.join(positive) or 'no finding'}"
                    )
                    if heatmaps is not None:
                        item["overlay_uri"] = array_uri(overlay(image, heatmaps(image, j)), THUMB_SIDE)
                items.append(item)
            empty = _NONE[key] + (
                f" at threshold {threshold:.2f}" if threshold is not None and key != "tp" else " in this split"
            )
            kinds.append({"key": key, "title": title, "meaning": meaning, "items": items, "empty": empty})
        findings.append({"name": name, "threshold": threshold, "kinds": kinds})
    return {"findings": findings, "note": note, "overlays": heatmaps is not None and bool(pixels)}
