"""``cxrflow localize``: does the model look where the lesion is? The ChestX-ray14 box benchmark.

For every ground-truth box (the store's ``_boxes.parquet``, written by the ETL from
``BBox_List_2017.csv``, or ``--bbox CSV``) whose image is in the split, the heatmap of the box's
finding (:mod:`cxrflow.modelling.heatmaps`) becomes predicted boxes the way Wang et al. 2017 made them
(:mod:`cxrflow.data.boxes`: normalise to 0-255, thresholds 60 and 180, bound each connected region; at
most ``--max-boxes`` per image and finding, best peak first). Boxes are found on the heatmap at the
store's resolution, over the pixels that cover the original image (the ETL's padding left out), and
mapped to original-image pixels. Each ground-truth box is scored with the best predicted box;
accuracy at T(IoBB) and T(IoU), per finding and overall, false-positive boxes per image, the same
figures for single thresholds (a sweep), and for a reference baseline: a fixed box at the finding's
mean ground-truth position over the train split (the image centre where the train split has none).

Writes ``localization.json``, ``boxes.csv`` (every predicted box, original pixels, so anyone can
recompute the figures) and ``gallery-<finding>.png`` (best and worst cases) to
``RUN/localize-<split>-<checkpoint>/`` or ``--out``. Boxes that cannot be scored (image not in the
store, box outside the image, ...) are listed with their reason in ``localization.json``.

Like an evaluation, a localization belongs to one checkpoint: ``localization.json`` records its
``checkpoint_sha256`` (with its stage and epoch), and :func:`localization_status` tells a consumer
whether it still describes the checkpoint the run holds now.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxrflow import __version__, csvsafe
from cxrflow.data.boxes import (
    BOXES_NAME,
    IOBB_THRESHOLDS,
    IOU_THRESHOLDS,
    MAX_BOXES,
    SWEEP_THRESHOLDS,
    WANG_THRESHOLDS,
    baseline_predictions,
    box_problem,
    evaluate_boxes,
    mean_boxes,
    predicted_boxes,
    read_boxes,
)
from cxrflow.errors import CxrflowError
from cxrflow.modelling.heatmaps import square_geometry, store_to_original
from cxrflow.names import file_part, printable
from cxrflow.outputs import check_target, publishing
from cxrflow.runs import Provenance, default_localize_dir

JSON_NAME = "localization.json"
BOXES_CSV = "boxes.csv"
#: Gallery cases per finding: this many best and this many worst ground-truth boxes (by IoU).
GALLERY_CASES = 2
#: Side of the images and heatmaps kept for the gallery (pixels).
THUMB = 256

#: Wang et al. 2017 (ChestX-ray8, CVPR), Table 3: localization accuracy of their ChestX-ray14 model.
WANG2017 = {
    "source": "Wang et al. 2017, ChestX-ray8 (CVPR), localization accuracy, Table 3",
    "accuracy_iobb": {
        "0.1": {"Atelectasis": 0.622, "Cardiomegaly": 1.0, "Effusion": 0.797, "Infiltration": 0.911,
                "Mass": 0.588, "Nodule": 0.152, "Pneumonia": 0.858, "Pneumothorax": 0.520},
        "0.5": {"Atelectasis": 0.194, "Cardiomegaly": 0.945, "Effusion": 0.418, "Infiltration": 0.650,
                "Mass": 0.306, "Nodule": 0.0, "Pneumonia": 0.483, "Pneumothorax": 0.265},
    },
}  # fmt: skip


# --- ground truth for one split ---------------------------------------------------------------------


def store_images(store: str | os.PathLike, size: int, manifest: dict) -> pd.DataFrame:
    """Every image of the store at ``size``: image_id, split, orig_width, orig_height (no pixels read)."""
    import pyarrow.parquet as pq

    from cxrflow.data.store import split_dir

    frames = []
    for split in manifest.get("rows", {}).get(str(int(size)), {}):
        files = sorted(split_dir(store, size, split).glob("*.parquet"))
        if not files:
            continue
        table = pq.ParquetDataset(files).read(columns=["image_id", "orig_width", "orig_height"])
        frame = table.to_pandas()
        frame["split"] = split
        frames.append(frame)
    if not frames:
        return pd.DataFrame({"image_id": [], "orig_width": [], "orig_height": [], "split": []})
    return pd.concat(frames, ignore_index=True)


def _absent_reason(manifest: dict) -> dict[str, str]:
    """Why an image the metadata names is not in the store: missing on disk or quarantined."""
    reasons = {str(i): "image not in the store (missing on disk at ETL time)" for i in manifest.get("missing", [])}
    for q in manifest.get("quarantined", []):
        reasons[str(q.get("image_id"))] = f"image not in the store (quarantined by the ETL: {q.get('reason')})"
    return reasons


def split_ground_truth(
    boxes: pd.DataFrame, images: pd.DataFrame, split: str, label_names: Sequence[str], manifest: dict
) -> tuple[pd.DataFrame, list[dict], dict[str, int]]:
    """(the split's scorable boxes with orig_width/orig_height, the unscorable ones with their reason,
    box counts of the store's other splits)."""
    merged = boxes.merge(images, on="image_id", how="left")
    absent = _absent_reason(manifest)
    unscored: list[dict] = []
    keep = np.zeros(len(merged), dtype=bool)
    known = set(label_names)
    for i, row in enumerate(merged.itertuples(index=False)):
        problem = None
        if not isinstance(row.split, str):
            problem = ("image not in the store", absent.get(row.image_id, "image not in the store"))
        elif row.split != split:
            continue
        elif row.finding not in known:
            problem = ("finding not a model output", "the finding is not one of the model's outputs")
        else:
            problem = box_problem(row.x, row.y, row.w, row.h, int(row.orig_width), int(row.orig_height))
        if problem is None:
            keep[i] = True
        else:
            unscored.append({"image_id": row.image_id, "finding": row.finding, "x": float(row.x), "y": float(row.y),
                             "w": float(row.w), "h": float(row.h), "kind": problem[0], "reason": problem[1]})  # fmt: skip
    other = merged[merged["split"].notna() & (merged["split"] != split)]["split"].value_counts()
    gt = merged[keep].reset_index(drop=True)
    gt["orig_width"] = gt["orig_width"].astype(np.int64)
    gt["orig_height"] = gt["orig_height"].astype(np.int64)
    return gt, unscored, {str(k): int(v) for k, v in other.items()}


# --- heatmaps to boxes over the split --------------------------------------------------------------


def boxes_in_original(
    heat: np.ndarray, orig_width: int, orig_height: int, thresholds: Sequence[float], max_boxes: int | None
) -> list[dict]:
    """Predicted boxes of a store-size heatmap, found over the pixels covering the original image,
    in original-image pixels (clipped to the image)."""
    size = heat.shape[0]
    side, left, top = square_geometry(orig_width, orig_height)
    c0, c1 = math.floor(left * size / side), math.ceil((left + orig_width) * size / side)
    r0, r1 = math.floor(top * size / side), math.ceil((top + orig_height) * size / side)
    out = []
    for b in predicted_boxes(heat[r0:r1, c0:c1], thresholds, max_boxes):
        x0, y0 = store_to_original(b["x"] + c0, b["y"] + r0, size, orig_width, orig_height)
        x1, y1 = store_to_original(b["x"] + c0 + b["w"], b["y"] + r0 + b["h"], size, orig_width, orig_height)
        x0, x1 = float(np.clip(x0, 0, orig_width)), float(np.clip(x1, 0, orig_width))
        y0, y1 = float(np.clip(y0, 0, orig_height)), float(np.clip(y1, 0, orig_height))
        out.append({**b, "x": x0, "y": y0, "w": x1 - x0, "h": y1 - y0})
    return out


@dataclass
class HeatmapPass:
    """What one pass over the split's images with boxes produced."""

    boxes: list[dict] = field(default_factory=list)  # main boxes (Wang's thresholds pooled)
    sweep: dict[float, list[dict]] = field(default_factory=dict)  # single-threshold boxes
    probability: dict[tuple[str, str], float] = field(default_factory=dict)
    thumbs: dict[str, np.ndarray] = field(default_factory=dict)  # image_id -> uint8 [<=THUMB]^2
    heat_thumbs: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0


def _thumb(array: np.ndarray | torch.Tensor, side: int) -> torch.Tensor:
    t = torch.as_tensor(array).float()
    if t.shape[-1] <= side:
        return t
    return torch.nn.functional.interpolate(t[None, None], size=(side, side), mode="area")[0, 0]


def _takes_demographics(model: torch.nn.Module) -> bool:
    from cxrflow.modelling.inference import unwrap

    return "demographics" in inspect.signature(unwrap(model).forward).parameters


def heatmap_pass(
    model: torch.nn.Module,
    store: str | os.PathLike,
    size: int,
    split: str,
    gt: pd.DataFrame,
    label_names: Sequence[str],
    *,
    method: str,
    pixel_mean: float,
    pixel_std: float,
    device: torch.device,
    batch_size: int,
    max_boxes: int,
) -> HeatmapPass:
    """Read the split in the store's order; for each image with boxes, the heatmap of each finding
    it has boxes for, turned into predicted boxes (main set and sweep)."""
    import time

    from cxrflow.data.loader import make_loader
    from cxrflow.modelling.heatmaps import heatmaps
    from cxrflow.modelling.inference import batch_logits, model_input

    wanted = {img: list(dict.fromkeys(f)) for img, f in gt.groupby("image_id", sort=False)["finding"]}
    dims = {r.image_id: (int(r.orig_width), int(r.orig_height)) for r in gt.drop_duplicates("image_id").itertuples()}
    index = {name: j for j, name in enumerate(label_names)}
    fused = _takes_demographics(model)
    result = HeatmapPass(sweep={float(t): [] for t in SWEEP_THRESHOLDS})
    started = time.perf_counter()
    for batch in make_loader(store, size, split, batch_size=batch_size, shuffle=False):
        ids = [str(i) for i in batch["image_id"]]
        sel = [k for k, i in enumerate(ids) if i in wanted]
        if not sel:
            continue
        images = batch["image"][sel].clone()
        demo = batch.get("demographics")
        demo = demo[sel].clone() if (fused and demo is not None) else None
        if demo is None:
            probs = torch.sigmoid(batch_logits(model, images, pixel_mean, pixel_std, device)).numpy()
        else:
            with torch.no_grad():
                probs = (
                    torch.sigmoid(model(model_input(images, pixel_mean, pixel_std, device), demo.to(device)))
                    .float()
                    .cpu()
                    .numpy()
                )
        pairs = [(k, ids[s], f) for k, s in enumerate(sel) for f in wanted[ids[s]]]
        rows = [k for k, _, _ in pairs]
        heat = heatmaps(
            model, images[rows], [index[f] for _, _, f in pairs], method=method, pixel_mean=pixel_mean,
            pixel_std=pixel_std, device=device, demographics=None if demo is None else demo[rows], batch_size=batch_size,
        )  # fmt: skip
        for (k, image_id, finding), h in zip(pairs, heat):
            w, hgt = dims[image_id]
            for rank, b in enumerate(boxes_in_original(h, w, hgt, WANG_THRESHOLDS, max_boxes), start=1):
                result.boxes.append({"image_id": image_id, "finding": finding, **b, "rank": rank})
            for t in SWEEP_THRESHOLDS:
                for b in boxes_in_original(h, w, hgt, (t,), max_boxes):
                    result.sweep[float(t)].append({"image_id": image_id, "finding": finding, **b})
            result.probability[(image_id, finding)] = float(probs[k, index[finding]])
            result.heat_thumbs[(image_id, finding)] = _thumb(h, THUMB // 2).numpy().astype(np.float16)
        for k, s in enumerate(sel):
            result.thumbs[ids[s]] = _thumb(images[k, 0], THUMB).round().clamp(0, 255).to(torch.uint8).numpy()
        result.images += len(sel)
    result.seconds = time.perf_counter() - started
    return result


def _frame(boxes: list[dict]) -> pd.DataFrame:
    columns = ["image_id", "finding", "x", "y", "w", "h", "score", "mean", "threshold", "rank"]
    frame = pd.DataFrame(boxes)
    return frame if len(frame) else pd.DataFrame({c: [] for c in columns})


# --- the whole benchmark ---------------------------------------------------------------------------


def localization_status(path: str | os.PathLike, result: dict) -> str | None:
    """None when the localization at ``path`` (its ``localization.json``) was made from the checkpoint
    its run holds now; else one line saying why not, naming the command that makes it again. Every
    consumer of a localization (the report's table, gallery and heatmap overlays) calls this first."""
    from shlex import quote

    from cxrflow.runs import checkpoint_status, evaluation_run

    run = quote(str(evaluation_run(path, result)))  # the run as it is now, so the command works as printed
    again = (f"run 'cxrflow localize --run {run} --checkpoint {result.get('checkpoint', '?')} "
             f"--split {result.get('split', 'test')} --overwrite' again")  # fmt: skip
    return checkpoint_status(path, result, "localization", again)


def check_output(out: Path, overwrite: bool, inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse, before any work, an ``out`` that is not ``localize``'s to replace or cannot be created."""
    check_target(out, "localize", overwrite=overwrite, inputs=inputs)
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CxrflowError(f"cannot create the output folder: {parent} is not a writable folder", out)


def publish(
    out: Path, overwrite: bool, write: Callable[[Path], None], inputs: Sequence[str | os.PathLike] = ()
) -> None:
    """The one place ``localize`` replaces its output folder: ``write`` fills the temporary folder of
    :func:`cxrflow.outputs.publishing`, which then replaces ``out``."""
    check_output(out, overwrite, inputs)
    with publishing(out, "localize", overwrite=overwrite, inputs=inputs) as pub:
        write(pub.tmp)
        pub.commit()


def _sweep_summary(gt: pd.DataFrame, sweep: dict[float, list[dict]], findings: Sequence[str]) -> dict:
    out = {}
    for t, boxes in sweep.items():
        r = evaluate_boxes(gt, _frame(boxes), findings)
        out[f"{t:g}"] = {
            "accuracy_iobb": {k: v["overall"] for k, v in r["accuracy_iobb"].items()},
            "accuracy_iou": {k: v["overall"] for k, v in r["accuracy_iou"].items()},
            "fp_per_image": r["fp_per_image_by_iobb"]["0.5"]["overall"],
            "boxes_per_pair": len(boxes) / max(1, len(gt[["image_id", "finding"]].drop_duplicates())),
        }
    return out


def _gallery_cases(scored: pd.DataFrame, finding: str, found: HeatmapPass, pred: pd.DataFrame) -> list[dict]:
    rows = scored[scored["finding"] == finding].sort_values(["best_iou", "best_iobb"], ascending=False)
    picked = list(rows.head(GALLERY_CASES).itertuples()) if len(rows) else []
    worst = [r for r in rows.tail(GALLERY_CASES).itertuples() if r.Index not in {p.Index for p in picked}]
    cases = []
    for label, chosen in (("best", picked), ("worst", worst)):
        for r in chosen:
            same = scored[(scored["image_id"] == r.image_id) & (scored["finding"] == finding)]
            p = pred[(pred["image_id"] == r.image_id) & (pred["finding"] == finding)] if len(pred) else pred
            cases.append({
                "label": label, "image_id": r.image_id, "image": found.thumbs[r.image_id],
                "heat": found.heat_thumbs[(r.image_id, finding)].astype(np.float32),
                "orig_width": int(r.orig_width), "orig_height": int(r.orig_height),
                "gt": same[["x", "y", "w", "h"]].to_numpy().tolist(), "pred": p[["x", "y", "w", "h"]].to_numpy().tolist(),
                "iou": float(r.best_iou), "iobb": float(r.best_iobb),
                "probability": found.probability.get((r.image_id, finding), float("nan")),
            })  # fmt: skip
    return cases


def _load(run: Path, checkpoint: str | None, store: str | os.PathLike | None, device: str):
    """(checkpoint name, the checkpoint loaded for scoring, its store's manifest)."""
    from cxrflow.data.store import check_partition, read_manifest
    from cxrflow.modelling.inference import check_label_names, resolve_inference
    from cxrflow.runs import resolve_checkpoint

    if not run.is_dir():
        raise CxrflowError("no such run folder", run)
    name, path = resolve_checkpoint(run, checkpoint)
    inference = resolve_inference(path, store, device=device)
    manifest = read_manifest(inference.store)
    check_label_names(inference.label_names, manifest, path)
    check_partition(manifest, inference.store, inference.size, "train")
    return name, inference, manifest


def ground_truth(
    store: Path, bbox: str | os.PathLike | None, manifest: dict, size: int, split: str, label_names: Sequence[str]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[dict], dict[str, int]]:
    """(all boxes, the store's images, the split's scorable boxes, the unscorable ones, other-split
    counts); a clear error when the split has no box to score."""
    from cxrflow.data.labels import LabelVocabulary

    vocab = LabelVocabulary.from_dict(manifest["vocabulary"]) if "vocabulary" in manifest else None
    boxes = read_boxes(store, bbox, vocab) if vocab is not None else read_boxes(store, bbox)
    images = store_images(store, size, manifest)
    gt, unscored, other = split_ground_truth(boxes, images, split, label_names, manifest)
    if gt.empty:
        where = f"--bbox {bbox}" if bbox is not None else f"{store}/{BOXES_NAME}"
        have = ", ".join(f"{k} {v}" for k, v in sorted(other.items())) or "none"
        raise CxrflowError(
            f"no boxes to score for the {split!r} split in {where} (boxes in other splits: {have}; "
            f"unscorable: {len(unscored)}); choose another --split or pass --bbox"
        )
    return boxes, images, gt, unscored, other


def baseline(boxes: pd.DataFrame, images: pd.DataFrame, gt: pd.DataFrame, label_names: Sequence[str]) -> dict:
    """The fixed-box baseline's boxes and accuracy tables."""
    train_gt = boxes.merge(images[images["split"] == "train"][["image_id"]], on="image_id")
    dims = images[["image_id", "orig_width", "orig_height"]]
    fixed = mean_boxes(train_gt, dims, label_names)
    scored = evaluate_boxes(gt, baseline_predictions(gt, dims, fixed), label_names)
    return {
        "kind": "fixed box: the finding's mean ground-truth box over the train split, else the image centre",
        "boxes": fixed,
        "accuracy_iobb": scored["accuracy_iobb"],
        "accuracy_iou": scored["accuracy_iou"],
    }


def write_outputs(
    tmp: Path, result: dict, pred: pd.DataFrame, scored: pd.DataFrame, found: HeatmapPass, title: str
) -> None:
    """``boxes.csv``, one gallery figure per finding with boxes, then ``localization.json`` into ``tmp``."""
    from cxrflow.atomic import save_figure_atomic, write_json_atomic
    from cxrflow.results.overlays import plot_gallery

    # full precision: the figures recomputed from boxes.csv must be the ones in localization.json, also
    # for the non-integer coordinates of a non-square original (1234.765625 is not 1234.77)
    csvsafe.write_frame(
        pred[["image_id", "finding", "x", "y", "w", "h", "score", "threshold", "rank"]], tmp / BOXES_CSV, index=False
    )
    figures = []
    for finding, n in result["n_boxes"].items():
        if n == 0:
            continue
        fig = plot_gallery(
            _gallery_cases(scored, finding, found, pred), finding=finding, method=result["method"],
            title=f"{finding} ({title}): ground truth green, predicted yellow",
        )  # fmt: skip
        figures.append(f"gallery-{file_part(finding)}.png")
        save_figure_atomic(fig, tmp / figures[-1], dpi=100)
    result["figures"] = figures
    write_json_atomic(tmp / JSON_NAME, result)


def localize_run(
    run: str | os.PathLike,
    *,
    checkpoint: str | None = None,
    split: str = "test",
    method: str | None = None,
    out: str | os.PathLike | None = None,
    bbox: str | os.PathLike | None = None,
    store: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 16,
    max_boxes: int = MAX_BOXES,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the box benchmark for one checkpoint and write its folder; returns localization.json's
    content with ``out`` added."""
    from cxrflow.data.store import check_partition
    from cxrflow.modelling.heatmaps import cam_method

    if max_boxes < 1:
        raise CxrflowError(f"--max-boxes must be at least 1, got {max_boxes}")
    run = Path(run)
    name, inference, manifest = _load(run, checkpoint, store, device)
    store, size, label_names = inference.store, inference.size, inference.label_names
    out = Path(out) if out is not None else default_localize_dir(run, split, name)
    check_output(out, overwrite, [run, store])
    check_partition(manifest, store, size, split)
    method = cam_method(inference.model, method)
    boxes, images, gt, unscored, other = ground_truth(store, bbox, manifest, size, split, label_names)
    found = heatmap_pass(
        inference.model, store, size, split, gt, label_names, method=method, pixel_mean=inference.pixel_mean,
        pixel_std=inference.pixel_std, device=inference.device, batch_size=batch_size, max_boxes=max_boxes,
    )  # fmt: skip
    pred = _frame(found.boxes)
    main = evaluate_boxes(gt, pred, label_names)
    result = {
        **Provenance.of(run, name, inference.path, inference.checkpoint, inference.sha256).record(),
        "store": str(store),
        "size": size,
        "split": split,
        "method": method,
        "box_source": str(bbox) if bbox is not None else f"{store}/{BOXES_NAME}",
        **box_rule(max_boxes),
        **_scores(main, boxes, images, gt, pred, found, label_names),
        "boxes_in_other_splits": other,
        "unscored": unscored,
        "unscored_count": len(unscored),
        "heatmap_seconds": round(found.seconds, 3),
        "device": str(inference.device),
        "cxrflow_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    title = f"{config_name(inference.checkpoint)}, {method}, {split}"
    publish(out, overwrite, lambda tmp: write_outputs(tmp, result, pred, main["scored"], found, title), [run, store])
    result["out"] = str(out)
    return result


def box_rule(max_boxes: int) -> dict[str, Any]:
    """How predicted boxes are made and scored, as recorded in ``localization.json``."""
    return {
        "thresholds": {
            "heatmap": list(WANG_THRESHOLDS),
            "sweep": list(SWEEP_THRESHOLDS),
            "iobb": list(IOBB_THRESHOLDS),
            "iou": list(IOU_THRESHOLDS),
        },  # fmt: skip
        "box_rule": (
            f"heatmap min-max normalised to 0-255 over the original image's pixels; regions at or above each of "
            f"{list(WANG_THRESHOLDS)} (8-connected) bounded and pooled; identical boxes merged; at most {max_boxes} "
            "per image and finding, ranked by the region's peak, then its mean; localised when best IoU/IoBB >= T"
        ),
        "max_boxes": max_boxes,
    }


def _scores(
    main: dict,
    boxes: pd.DataFrame,
    images: pd.DataFrame,
    gt: pd.DataFrame,
    pred: pd.DataFrame,
    found: HeatmapPass,
    label_names: Sequence[str],
) -> dict[str, Any]:
    """The model's accuracy tables (``main``, from :func:`evaluate_boxes`), the baseline's, the
    threshold sweep, Wang et al.'s figures and the box counts."""
    n_boxes = {n: int((gt["finding"] == n).sum()) for n in label_names}
    return {
        "accuracy_iobb": main["accuracy_iobb"],
        "accuracy_iou": main["accuracy_iou"],
        "fp_per_image": main["fp_per_image_by_iobb"]["0.5"],
        "fp_per_image_by_iobb": main["fp_per_image_by_iobb"],
        "baseline": baseline(boxes, images, gt, label_names),
        "sweep": _sweep_summary(gt, found.sweep, label_names),
        "wang2017": WANG2017,
        "n_boxes": n_boxes,
        "n_images": int(gt["image_id"].nunique()),
        "n_predicted_boxes": int(len(pred)),
        "findings_without_boxes": [n for n in label_names if n_boxes[n] == 0],
    }


def config_name(ckpt: dict) -> str:
    config = ckpt.get("config") or {}
    return f"{config.get('model')} {config.get('size')}px"


# --- CLI -------------------------------------------------------------------------------------------


def format_table(result: dict) -> str:
    """Accuracy per finding at T(IoBB) 0.1 and 0.5 and T(IoU) 0.5: model, fixed-box baseline, Wang 2017."""

    def f(x: float | None) -> str:
        return "  n/a" if x is None else f"{x:5.3f}"

    acc, base, wang = result["accuracy_iobb"], result["baseline"]["accuracy_iobb"], result["wang2017"]["accuracy_iobb"]
    iou, base_iou = result["accuracy_iou"], result["baseline"]["accuracy_iou"]
    lines = [
        f"{result['model']} {result['size']}px {result['checkpoint']}, {result['method']}, {result['split']} split: "
        f"{sum(result['n_boxes'].values())} boxes on {result['n_images']} images, at most {result['max_boxes']} "
        f"predicted boxes per image and finding",
        f"{'finding':<20} {'boxes':>5}  {'IoBB>=0.1 model/base/Wang':<26} {'IoBB>=0.5 model/base/Wang':<26} "
        f"{'IoU>=0.5 model/base':<20} {'FP/img':>6}",
    ]
    for name in [*result["n_boxes"], "overall"]:
        n = sum(result["n_boxes"].values()) if name == "overall" else result["n_boxes"][name]
        if n == 0:
            continue
        cells = [f"{f(acc[t][name])} {f(base[t][name])} {f(wang.get(t, {}).get(name))}" for t in ("0.1", "0.5")]
        fp = result["fp_per_image"].get(name)
        lines.append(
            f"{printable(name):<20} {n:>5}  {cells[0]:<26} {cells[1]:<26} {f(iou['0.5'][name]) + ' ' + f(base_iou['0.5'][name]):<20} "
            f"{'n/a' if fp is None else f'{fp:6.2f}':>6}"
        )
    return "\n".join(map(printable, lines))  # names and folders are data: never terminal controls
