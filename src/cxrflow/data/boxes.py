"""Bounding boxes: the ground truth (the store's ``_boxes.parquet``, see :data:`BOXES_NAME`, or a
``BBox_List_2017.csv``) and the box arithmetic of the localization benchmark (Wang et al. 2017,
ChestX-ray8, section 4.2).

Boxes are ``x, y, w, h`` in original-image pixels (x to the right, y down, as the release writes
them). From a heatmap normalised to 0-255, :func:`region_boxes` bounds each connected region
(8-connectivity, ``scipy.ndimage.label``) of the pixels at or above a threshold; :func:`predicted_boxes`
pools the regions of Wang's two thresholds (60 and 180), drops duplicates and keeps the
``max_boxes`` best, ranked by the region's peak value, then its mean value (so the box around the
strongest peak comes first, the tight 180-box before the wider 60-box around the same peak).
A ground-truth box is scored against its image's predicted boxes of the same finding: IoU
(intersection over union) and IoBB (intersection over the *predicted* box's area) with the best
predicted box; it counts as localised at threshold T when that value is at least T.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxrflow.data.labels import NIH14, LabelVocabulary
from cxrflow.errors import CxrflowError

#: The store's box file. CONTRACTS.md names it ``boxes.parquet``; the leading underscore keeps it out
#: of ``pyarrow.dataset.dataset(STORE, partitioning="hive")`` (which skips ``_``/``.`` names, as for
#: ``_manifest.json``), where a ``boxes.parquet`` would be read as the store's first fragment and its
#: schema. :func:`read_boxes` also reads a ``boxes.parquet``.
BOXES_NAME = "_boxes.parquet"
BOXES_NAMES = (BOXES_NAME, "boxes.parquet")
BOX_COLUMNS = ("image_id", "finding", "x", "y", "w", "h")
#: Wang et al. 2017's heatmap thresholds (on the 0-255 scale) and the benchmark's accuracy thresholds.
WANG_THRESHOLDS = (60, 180)
SWEEP_THRESHOLDS = tuple(range(20, 256, 20))
IOBB_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)
IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
MAX_BOXES = 3
#: A ground-truth box may reach this far (pixels) past the image edge and still be scored.
EDGE_TOLERANCE = 1.0


# --- ground truth ----------------------------------------------------------------------------------


def write_boxes(store: str | os.PathLike, frame: pd.DataFrame) -> dict:
    """Write ``STORE/_boxes.parquet`` (canonical finding names, original pixels); returns the
    manifest's ``"boxes"`` entry (file, rows, per-finding counts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxrflow.atomic import atomic_path

    frame = frame[list(BOX_COLUMNS)]
    table = pa.table(
        {
            "image_id": pa.array(frame["image_id"].astype(str).tolist(), pa.string()),
            "finding": pa.array(frame["finding"].astype(str).tolist(), pa.string()),
            **{c: pa.array(frame[c].to_numpy(np.float64), pa.float64()) for c in ("x", "y", "w", "h")},
        }
    )
    with atomic_path(Path(store) / BOXES_NAME, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    return {
        "file": BOXES_NAME,
        "rows": int(len(frame)),
        "per_finding": {str(k): int(v) for k, v in frame["finding"].value_counts().sort_index().items()},
    }


def read_boxes(
    store: str | os.PathLike | None, bbox_csv: str | os.PathLike | None, vocab: LabelVocabulary = NIH14
) -> pd.DataFrame:
    """Ground-truth boxes: from ``bbox_csv`` (a ``BBox_List_2017.csv``) when given, else from the
    store's box file; a clear error when neither is there."""
    if bbox_csv is not None:
        from cxrflow.data.metadata import read_bbox

        return read_bbox(bbox_csv, vocab).reset_index(drop=True)
    path = next((Path(store) / n for n in BOXES_NAMES if (Path(store) / n).is_file()), None)
    if path is None:
        raise CxrflowError(
            f"the store has no {BOXES_NAME} (its source had no BBox_List_2017.csv); pass --bbox BBox_List_2017.csv",
            store,
        )
    import pyarrow.parquet as pq

    try:
        frame = pq.read_table(path).to_pandas()
    except Exception as exc:  # a damaged file fails in pyarrow in many ways
        raise CxrflowError(f"unreadable box file: {str(exc).splitlines()[0][:200]}", path) from None
    missing = [c for c in BOX_COLUMNS if c not in frame.columns]
    if missing:
        raise CxrflowError(f"not a cxrflow box file: columns {missing} are missing", path)
    unknown = sorted(set(frame["finding"]) - set(vocab.names))
    if unknown:
        raise CxrflowError(f"box file names findings the store does not have: {', '.join(unknown)}", path)
    return frame[list(BOX_COLUMNS)].reset_index(drop=True)


def box_problem(x: float, y: float, w: float, h: float, width: int, height: int) -> tuple[str, str] | None:
    """(kind, reason) why a ground-truth box cannot be scored on a ``width`` x ``height`` image, or None."""
    if not all(np.isfinite(v) for v in (x, y, w, h)):
        return "non-finite box", "box has a non-finite coordinate"
    if w <= 0 or h <= 0:
        return "empty box", f"empty box (w={w:g}, h={h:g})"
    t = EDGE_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return (
            "box outside the image",
            f"box x={x:g}..{x + w:g}, y={y:g}..{y + h:g} is outside the {width}x{height} image",
        )
    return None


# --- boxes from a heatmap ------------------------------------------------------------------------


def region_boxes(heat255: np.ndarray, threshold: float) -> list[tuple[float, float, float, float, float, float]]:
    """``(x, y, w, h, peak, mean)`` of each connected region of ``heat255 >= threshold`` (pixel units,
    peak and mean on the 0-255 scale), in label order."""
    from scipy import ndimage

    mask = heat255 >= threshold
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    peaks = ndimage.maximum(heat255, labels, index)
    means = ndimage.mean(heat255, labels, index)
    out = []
    for (rows, cols), peak, mean in zip(ndimage.find_objects(labels), peaks, means):
        out.append((float(cols.start), float(rows.start), float(cols.stop - cols.start), float(rows.stop - rows.start),
                    float(peak), float(mean)))  # fmt: skip
    return out


def normalise255(heat: np.ndarray) -> np.ndarray:
    """Min-max scale a heatmap to 0-255 (float); a constant map becomes all zeros."""
    heat = np.asarray(heat, dtype=np.float64)
    low, high = float(heat.min()), float(heat.max())
    if not high > low:
        return np.zeros_like(heat)
    return (heat - low) / (high - low) * 255.0


def predicted_boxes(
    heat: np.ndarray, thresholds: Sequence[float] = WANG_THRESHOLDS, max_boxes: int | None = MAX_BOXES
) -> list[dict]:
    """The kept boxes of one heatmap (any scale; normalised to 0-255 first), best first:
    ``{"x", "y", "w", "h", "score" (peak / 255), "mean" (/ 255), "threshold"}``."""
    heat255 = normalise255(heat)
    found: dict[tuple[float, float, float, float], dict] = {}
    for t in thresholds:
        for x, y, w, h, peak, mean in region_boxes(heat255, t):
            box = {"x": x, "y": y, "w": w, "h": h, "score": peak / 255.0, "mean": mean / 255.0, "threshold": float(t)}
            old = found.get((x, y, w, h))
            if old is None or (box["score"], box["mean"]) > (old["score"], old["mean"]):
                found[(x, y, w, h)] = box
    ranked = sorted(found.values(), key=lambda b: (-b["score"], -b["mean"], b["w"] * b["h"]))
    return ranked if max_boxes is None else ranked[:max_boxes]


# --- scoring --------------------------------------------------------------------------------------


def overlaps(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU and IoBB ``[G, P]`` of ground-truth boxes ``gt [G, 4]`` against predicted ``pred [P, 4]``
    (rows ``x, y, w, h``). IoBB divides the intersection by the predicted box's area."""
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(gt[:, None, 0], pred[None, :, 0])
    y0 = np.maximum(gt[:, None, 1], pred[None, :, 1])
    x1 = np.minimum(gt[:, None, 0] + gt[:, None, 2], pred[None, :, 0] + pred[None, :, 2])
    y1 = np.minimum(gt[:, None, 1] + gt[:, None, 3], pred[None, :, 1] + pred[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_gt = gt[:, 2] * gt[:, 3]
    area_pred = pred[:, 2] * pred[:, 3]
    union = area_gt[:, None] + area_pred[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
        iobb = np.where(area_pred[None, :] > 0, inter / area_pred[None, :], 0.0)
    return iou, iobb


def _pair_codes(gt: pd.DataFrame, pred: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """One integer per (image_id, finding), shared by the ground-truth and the predicted rows."""
    keys = pd.concat([gt["image_id"].astype(str) + "\0" + gt["finding"].astype(str),
                      pred["image_id"].astype(str) + "\0" + pred["finding"].astype(str)], ignore_index=True)  # fmt: skip
    codes, _ = pd.factorize(keys)
    return codes[: len(gt)], codes[len(gt) :]


def match_boxes(gt: pd.DataFrame, pred: pd.DataFrame) -> dict[str, np.ndarray]:
    """Ground truth against the predicted boxes of the same image and finding: ``best_iou`` and
    ``best_iobb`` per ground-truth box (0 without predicted boxes), ``pred_iobb`` per predicted box
    (its best IoBB with a ground-truth box of its pair, 0 without one) and ``gt_pair`` (pair codes)."""
    gt_codes, pred_codes = _pair_codes(gt, pred)
    g_boxes = gt[["x", "y", "w", "h"]].to_numpy(np.float64)
    p_boxes = pred[["x", "y", "w", "h"]].to_numpy(np.float64).reshape(-1, 4)
    best_iou = np.zeros(len(gt))
    best_iobb = np.zeros(len(gt))
    pred_iobb = np.zeros(len(pred))
    p_order = np.argsort(pred_codes, kind="stable")
    p_starts = np.searchsorted(pred_codes[p_order], np.arange(gt_codes.max() + 2 if len(gt_codes) else 1))
    g_order = np.argsort(gt_codes, kind="stable")
    g_sorted = gt_codes[g_order]
    bounds = np.flatnonzero(np.diff(g_sorted)) + 1
    for g_idx in np.split(g_order, bounds) if len(g_order) else []:
        code = gt_codes[g_idx[0]]
        p_idx = p_order[p_starts[code] : p_starts[code + 1]] if code + 1 < len(p_starts) else np.zeros(0, np.int64)
        if len(p_idx) == 0:
            continue
        iou, iobb = overlaps(g_boxes[g_idx], p_boxes[p_idx])
        best_iou[g_idx] = iou.max(axis=1)
        best_iobb[g_idx] = iobb.max(axis=1)
        pred_iobb[p_idx] = iobb.max(axis=0)
    return {"best_iou": best_iou, "best_iobb": best_iobb, "pred_iobb": pred_iobb, "gt_pair": gt_codes,
            "pred_pair": pred_codes}  # fmt: skip


def score_ground_truth(gt: pd.DataFrame, pred: pd.DataFrame) -> pd.DataFrame:
    """``gt`` with ``best_iou`` and ``best_iobb`` against the predicted boxes (same columns) of the
    same image and finding; 0 where there are none."""
    m = match_boxes(gt, pred)
    return gt.assign(best_iou=m["best_iou"], best_iobb=m["best_iobb"])


def _key(t: float) -> str:
    return f"{t:g}"


def accuracy_table(scored: pd.DataFrame, column: str, thresholds: Sequence[float], findings: Sequence[str]) -> dict:
    """``{"<T>": {finding: share of its boxes with column >= T, or None without boxes, "overall": ...}}``."""
    table = {}
    names = scored["finding"].to_numpy()
    for t in thresholds:
        hit = scored[column].to_numpy() >= t
        row: dict[str, float | None] = {}
        for name in findings:
            mask = names == name
            row[name] = float(hit[mask].mean()) if mask.any() else None
        row["overall"] = float(hit.mean()) if len(hit) else None
        table[_key(t)] = row
    return table


def fp_per_image(gt: pd.DataFrame, pred: pd.DataFrame, match: dict, threshold: float, findings: Sequence[str]) -> dict:
    """Average false-positive boxes per image with ground truth of the finding (per finding; overall:
    per image and finding): predicted boxes whose IoBB with every ground-truth box of their image and
    finding is below ``threshold``."""
    pairs = np.unique(match["gt_pair"])
    fp = np.bincount(match["pred_pair"][match["pred_iobb"] < threshold], minlength=int(pairs.max(initial=-1)) + 1)
    first = pd.Series(np.arange(len(gt))).groupby(match["gt_pair"]).first()
    finding_of_pair = gt["finding"].to_numpy()[first.to_numpy()]
    counts = fp[first.index.to_numpy()] if len(first) else np.zeros(0)
    out: dict[str, float | None] = {}
    for name in findings:
        mask = finding_of_pair == name
        out[name] = float(counts[mask].mean()) if mask.any() else None
    out["overall"] = float(counts.mean()) if len(counts) else None
    return out


def evaluate_boxes(gt: pd.DataFrame, pred: pd.DataFrame, findings: Sequence[str]) -> dict:
    """Every figure of the benchmark for one set of predicted boxes: accuracy at each T(IoBB) and
    T(IoU) per finding and overall, and false positives per image at each T(IoBB)."""
    m = match_boxes(gt, pred)
    scored = gt.assign(best_iou=m["best_iou"], best_iobb=m["best_iobb"])
    return {
        "accuracy_iobb": accuracy_table(scored, "best_iobb", IOBB_THRESHOLDS, findings),
        "accuracy_iou": accuracy_table(scored, "best_iou", IOU_THRESHOLDS, findings),
        "fp_per_image_by_iobb": {_key(t): fp_per_image(gt, pred, m, t, findings) for t in IOBB_THRESHOLDS},
        "scored": scored,
    }


# --- the fixed-box baseline -----------------------------------------------------------------------

#: Fallback box (fractions of width and height) for a finding without training boxes: the centre half.
CENTRE_BOX = (0.25, 0.25, 0.5, 0.5)


def mean_boxes(train_gt: pd.DataFrame, dims: pd.DataFrame, findings: Sequence[str]) -> dict[str, dict]:
    """Per finding: the mean ground-truth box over ``train_gt`` as fractions of the image
    (``dims``: image_id -> orig_width, orig_height) and where it came from."""
    out: dict[str, dict] = {}
    frame = train_gt.merge(dims, on="image_id", how="inner")
    for name in findings:
        rows = frame[frame["finding"] == name]
        if len(rows):
            w, h = rows["orig_width"].to_numpy(np.float64), rows["orig_height"].to_numpy(np.float64)
            rel = (rows["x"] / w, rows["y"] / h, rows["w"] / w, rows["h"] / h)
            out[name] = {"box": [float(np.mean(v)) for v in rel], "source": f"mean of {len(rows)} train boxes"}
        else:
            out[name] = {"box": list(CENTRE_BOX), "source": "image centre (no train boxes)"}
    return out


def baseline_predictions(gt: pd.DataFrame, dims: pd.DataFrame, fixed: dict[str, dict]) -> pd.DataFrame:
    """One fixed box per (image, finding) of ``gt``, scaled to that image."""
    pairs = gt[["image_id", "finding"]].drop_duplicates().merge(dims, on="image_id", how="left")
    rel = np.array([fixed[f]["box"] for f in pairs["finding"]], dtype=np.float64).reshape(-1, 4)
    w = pairs["orig_width"].to_numpy(np.float64)
    h = pairs["orig_height"].to_numpy(np.float64)
    return pd.DataFrame(
        {
            "image_id": pairs["image_id"].to_numpy(),
            "finding": pairs["finding"].to_numpy(),
            "x": rel[:, 0] * w,
            "y": rel[:, 1] * h,
            "w": rel[:, 2] * w,
            "h": rel[:, 3] * h,
        }
    )
