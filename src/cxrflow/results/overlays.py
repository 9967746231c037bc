"""Figures of heatmaps: one overlay per image and finding (``cxrflow predict --heatmaps``) and the
localization gallery (``cxrflow localize``). Both draw in original-image pixel coordinates; a
square store image or heatmap is placed there through :func:`cxrflow.modelling.heatmaps.original_extent`.
Functions return figures; callers save them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cxrflow.modelling.heatmaps import original_extent

HEAT_CMAP = "jet"
HEAT_ALPHA = 0.4


def _figure(**kwargs):
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _draw(ax, image: np.ndarray, heat: np.ndarray, orig_width: int, orig_height: int, *, image_is_square: bool):
    """Gray image and heatmap on ``ax`` in original pixels; returns the heatmap's artist."""
    extent = original_extent(orig_width, orig_height)
    image_extent = extent if image_is_square else (0, orig_width, orig_height, 0)
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, extent=image_extent, interpolation="bilinear")
    artist = ax.imshow(
        heat, cmap=HEAT_CMAP, alpha=HEAT_ALPHA, vmin=0.0, vmax=1.0, extent=extent, interpolation="bilinear"
    )
    ax.set_xlim(0, orig_width)
    ax.set_ylim(orig_height, 0)
    return artist


def _boxes(ax, boxes: Sequence[Sequence[float]], color: str, style: str = "-") -> None:
    from matplotlib.patches import Rectangle

    for x, y, w, h in boxes:
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=color, linewidth=1.6, linestyle=style))


def plot_overlay(
    gray: np.ndarray,
    heat: np.ndarray,
    *,
    finding: str,
    probability: float,
    method: str,
    source: str = "",
    display: np.ndarray | None = None,
):
    """One image (``gray``: uint8 at its original size) with the finding's store-size heatmap over it,
    a colour bar, and the finding and probability in the title. ``display``: a reduced copy of
    ``gray`` to draw instead (same aspect; coordinates stay the original's)."""
    height, width = gray.shape
    fig = _figure(figsize=(5.6, 5.0))
    ax = fig.add_subplot()
    artist = _draw(ax, gray if display is None else display, heat, width, height, image_is_square=False)
    fig.colorbar(artist, ax=ax, shrink=0.85, label=f"{method} heatmap (relative, 0-1)")
    ax.set_title(f"{finding}: probability {probability:.3f}" + (f"\n{source}" if source else ""), fontsize=10)
    ax.set_xlabel("x (original pixels)")
    ax.set_ylabel("y (original pixels)")
    return fig


def plot_gallery(cases: Sequence[dict], *, finding: str, method: str, title: str = ""):
    """Cases of one finding side by side: store image, heatmap, ground-truth boxes (green), predicted
    boxes (yellow, dashed). A case: ``image``, ``heat`` (square arrays), ``orig_width``, ``orig_height``,
    ``gt``, ``pred`` (lists of x, y, w, h), ``label``, ``image_id``, ``iou``, ``iobb``, ``probability``."""
    n = max(1, len(cases))
    fig = _figure(figsize=(3.2 * n + 0.8, 3.9))
    fig.subplots_adjust(left=0.06, right=0.88, bottom=0.14, top=0.78, wspace=0.35)
    axes = fig.subplots(1, n, squeeze=False)[0]
    artist = None
    for ax, case in zip(axes, cases):
        artist = _draw(ax, case["image"], case["heat"], case["orig_width"], case["orig_height"], image_is_square=True)
        _boxes(ax, case["gt"], "lime")
        _boxes(ax, case["pred"], "yellow", "--")
        ax.set_title(
            f"{case['label']}: {case['image_id']}\nIoU {case['iou']:.2f}, IoBB {case['iobb']:.2f}, p={case['probability']:.2f}",
            fontsize=8,
        )
        ax.set_xlabel("x (original pixels)", fontsize=8)
        ax.set_ylabel("y (original pixels)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(cases) :]:
        ax.set_axis_off()
    if artist is not None:
        fig.colorbar(artist, cax=fig.add_axes((0.9, 0.14, 0.015, 0.64)), label=f"{method} heatmap (relative, 0-1)")
    fig.suptitle(
        title or f"{finding}: ground truth (green) and predicted boxes (yellow), best and worst cases", fontsize=10
    )
    return fig


#: Findings drawn by ``cxrflow predict --heatmaps`` when the run has no validation thresholds.
DEFAULT_FLAG_PROBABILITY = 0.5
#: Longest side of the original image drawn under a heatmap (larger images are shown reduced).
OVERLAY_MAX_SIDE = 1024


def flagged_findings(prediction: dict) -> list[str]:
    """The findings of one ``predict`` result that get a heatmap: those positive at the run's
    validation thresholds, or with probability >= 0.5 when the run was not evaluated."""
    if "positive" in prediction:
        return list(prediction["positive"])
    return [n for n, p in prediction["probabilities"].items() if p >= DEFAULT_FLAG_PROBABILITY]


def check_heatmap_predictor(predictor) -> None:
    """Heatmaps come from one model's class-activation layer: an ensemble has no single one."""
    from cxrflow.errors import CxrflowError

    if getattr(predictor, "model", None) is None:
        raise CxrflowError(f"heatmaps need a single model's run, not an ensemble ({predictor.checkpoint})")


def prediction_heatmaps(predictor, prediction: dict, findings: Sequence[str], method: str) -> np.ndarray:
    """Heatmaps ``float32[len(findings), S, S]`` in [0, 1] of ``findings`` on one ``predict`` result's
    image (the run's preprocessing, its class-activation layer; a fused run gets the image's demographics)."""
    import torch

    from cxrflow.data.demographics import FIELDS, encode
    from cxrflow.data.imaging import preprocess
    from cxrflow.modelling.heatmaps import heatmaps

    image = preprocess(prediction["image"], [predictor.size])[predictor.size]
    demo = None
    if predictor.uses_demographics and "demographics" in prediction:
        known = tuple(prediction["demographics"][f] for f in FIELDS)
        demo = torch.from_numpy(encode([known] * len(findings)))
    return heatmaps(
        predictor.model, np.repeat(image[None], len(findings), axis=0), [predictor.label_names.index(n) for n in findings],
        method=method, pixel_mean=predictor.mean, pixel_std=predictor.std, device=predictor.device, demographics=demo,
    )  # fmt: skip


def original_gray(path) -> tuple[np.ndarray, np.ndarray | None]:
    """The original image in 8-bit gray, and a copy reduced to :data:`OVERLAY_MAX_SIDE` to draw when
    it is larger (None otherwise)."""
    from PIL import Image

    from cxrflow.data.imaging import load_gray

    gray, _ = load_gray(path)
    if max(gray.shape) <= OVERLAY_MAX_SIDE:
        return gray, None
    scale = OVERLAY_MAX_SIDE / max(gray.shape)
    shown = Image.fromarray(gray).resize((max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale))))
    return gray, np.asarray(shown)


def prediction_overlay(prediction: dict, finding: str, heat: np.ndarray, method: str, original=None):
    """The overlay figure of one finding's heatmap on a ``predict`` result's original image
    (``original``: :func:`original_gray`'s result, when the caller already has it)."""
    from pathlib import Path

    gray, shown = original if original is not None else original_gray(prediction["image"])
    return plot_overlay(gray, heat, finding=finding, probability=prediction["probabilities"][finding], method=method,
                        source=Path(prediction["image"]).name, display=shown)  # fmt: skip


def write_prediction_heatmaps(predictor, predictions: list[dict], out_dir, *, method: str | None = None) -> str:
    """One overlay PNG per image and flagged finding in ``out_dir`` (``<image stem>-<finding>.png``);
    adds ``"heatmaps": {finding: path}`` to each prediction. Returns the method used."""
    from pathlib import Path

    from cxrflow.errors import CxrflowError
    from cxrflow.modelling.heatmaps import cam_method
    from cxrflow.outputs import OutputLock, refuse_inside_sealed

    check_heatmap_predictor(predictor)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CxrflowError("exists and is not a folder; choose another --heatmaps folder", out_dir)
    refuse_inside_sealed(out_dir, "predict")
    method = cam_method(predictor.model, method)
    # two predicts adding to one DIR at once would each rewrite its list of overlays without the other's
    with OutputLock(out_dir, "predict"):
        _write_overlays(predictor, predictions, out_dir, method)
    return method


def _write_overlays(predictor, predictions: list[dict], out_dir, method: str) -> None:
    """The overlays of :func:`write_prediction_heatmaps`, written while its lock on ``out_dir`` is held."""
    import os
    from pathlib import Path

    from cxrflow.atomic import save_figure_atomic
    from cxrflow.errors import CxrflowError
    from cxrflow.names import file_part, path_tag
    from cxrflow.outputs import read_marker, write_marker

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CxrflowError(f"cannot create the heatmap folder: {exc.strerror or exc}", out_dir) from None
    stems = [Path(p["image"]).stem for p in predictions]
    targets = [
        [
            out_dir / f"{file_part(stem)}-{path_tag(prediction['image'])}-{file_part(name)}.png"
            for name in flagged_findings(prediction)
        ]
        for i, (prediction, stem) in enumerate(zip(predictions, stems))
    ]
    # a file in DIR is replaced only when an earlier predict wrote it (listed in DIR's marker)
    listed = (read_marker(out_dir, "predict") or {}).get("files")
    ours = {name for name in listed if isinstance(name, str)} if isinstance(listed, list) else set()
    taken = next((t for paths in targets for t in paths if os.path.lexists(t) and t.name not in ours), None)
    if taken is not None:
        raise CxrflowError(
            "exists and is not a heatmap cxrflow predict wrote; refusing to replace it, choose another --heatmaps folder",
            taken,
        )
    for i, prediction in enumerate(predictions):
        names = flagged_findings(prediction)
        prediction["heatmaps"] = {}
        if not names:
            continue
        maps = prediction_heatmaps(predictor, prediction, names, method)
        original = original_gray(prediction["image"])
        for name, heat, path in zip(names, maps, targets[i]):
            fig = prediction_overlay(prediction, name, heat, method, original)
            ours.add(path.name)
            write_marker(out_dir, "predict", files=sorted(ours))  # before the file: a kill leaves it listed as ours
            save_figure_atomic(fig, path, dpi=100)
            prediction["heatmaps"][name] = str(path)
