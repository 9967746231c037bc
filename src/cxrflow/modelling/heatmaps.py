"""Where a model looks: class-activation heatmaps per finding, and their place in the original image.

Two methods, both computed by Captum on the layer each model's registry entry names
(its :class:`~cxrflow.modelling.registry.ModelEntry`'s ``cam``), in float32 (autocast off, even for a model trained in bf16):

- ``gradcam`` (Selvaraju et al. 2017): Captum's ``LayerGradCam``: the layer's channels weighted
  by their spatially averaged gradient of the finding's logit, summed, then ReLU. Faithful where
  the head sees globally pooled features (DenseNet-121, ResNet-50).
- ``hirescam`` (Draelos & Carin 2020): Captum's ``LayerGradientXActivation`` (gradient times
  activation, element-wise), summed over channels, then ReLU. Where the head weighs grid positions
  separately (``simple_cnn`` flattens an 8x8 grid into its linear layer), averaging the gradient
  over positions would blur exactly the position-specific weights the head learned; HiResCAM keeps
  them, and for a piecewise-linear path from the layer to the logit (ReLU, max and average pooling,
  linear head) its map sums to the logit less the head's bias.

A fused model (``forward(x, demographics)``) gets its demographics as a fixed extra input: the
gradient is taken with respect to the image path only.

Maps are upsampled (bilinear) to the store image and scaled to [0, 1] by their maximum.
:func:`to_original` and :func:`store_to_original` undo the ETL's geometry (see
:mod:`cxrflow.data.imaging`: the image is padded to a centred black square of side max(width, height),
then resized to the store size), so a heatmap or a box lands on the original image's pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrflow.errors import CxrflowError
from cxrflow.modelling.registry import CAM_METHODS as METHODS


def cam_method(model: nn.Module, method: str | None = None) -> str:
    """The method to use: ``method`` when given (checked), else the model's registered default."""
    if method in (None, "", "auto"):
        return _entry(model).cam.method
    if method not in METHODS:
        raise CxrflowError(f"unknown heatmap method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def _entry(model: nn.Module):
    """The registry entry of ``model`` (a ChestClassifier, possibly wrapped)."""
    from cxrflow.modelling.inference import unwrap
    from cxrflow.modelling.registry import model_entry, model_names

    name = getattr(unwrap(model), "name", None)
    if name not in model_names():
        raise CxrflowError(
            f"model {name!r} names no class-activation layer; heatmaps need one of {', '.join(model_names())}"
        )
    return model_entry(name)


def cam_layer(model: nn.Module) -> nn.Module:
    """The submodule whose activations the heatmaps use (from the model's registry entry)."""
    from cxrflow.modelling.inference import unwrap

    return unwrap(model).get_submodule(_entry(model).cam.layer)


def class_activation_maps(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: Sequence[int],
    *,
    method: str | None = None,
    demographics: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw maps ``float32[N, h, w]`` (>= 0, at the layer's resolution) of finding ``targets[i]`` for
    model input ``inputs[i]`` (normalised float ``[N, 3, S, S]``). The model must be in eval mode."""
    from captum.attr import LayerGradCam, LayerGradientXActivation

    from cxrflow.modelling.inference import unwrap

    method = cam_method(model, method)
    net = unwrap(model)
    layer = cam_layer(net)
    extra = None if demographics is None else (demographics.to(inputs.device).float(),)
    target = [int(t) for t in targets]
    with torch.autocast(device_type=inputs.device.type, enabled=False):
        x = inputs.float()
        if method == "gradcam":
            attr = LayerGradCam(net, layer).attribute(
                x, target=target, additional_forward_args=extra, relu_attributions=True
            )
        else:
            attr = LayerGradientXActivation(net, layer).attribute(x, target=target, additional_forward_args=extra)
            attr = attr.sum(dim=1, keepdim=True).clamp_min(0.0)
    return attr[:, 0].detach().float()


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, h, w]`` maps to ``[N, size, size]`` (bilinear), each scaled to [0, 1] by its maximum
    (an all-zero map, where nothing raises the logit, stays zero)."""
    up = F.interpolate(maps[:, None], size=(int(size), int(size)), mode="bilinear", align_corners=False)[:, 0]
    up = up.clamp_min(0.0)
    peak = up.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, up / peak.clamp_min(torch.finfo(up.dtype).tiny), torch.zeros_like(up))


def heatmaps(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    targets: Sequence[int],
    *,
    method: str | None = None,
    pixel_mean: float,
    pixel_std: float,
    device: str | torch.device = "cpu",
    demographics: torch.Tensor | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Heatmaps ``float32[N, S, S]`` in [0, 1] of finding ``targets[i]`` on uint8 image ``images[i]``
    (``[N, S, S]`` or ``[N, 1, S, S]``), normalised as the model was trained."""
    from cxrflow.modelling.inference import model_input, resolve_device, unwrap

    device = resolve_device(device)
    net = unwrap(model)
    # a read-only array (pixels straight from a Parquet buffer) is copied: torch warns on those
    images = torch.as_tensor(np.require(images, requirements="W") if isinstance(images, np.ndarray) else images)
    if images.dtype != torch.uint8 or images.dim() not in (3, 4):
        raise ValueError(f"expected uint8 images [N, S, S] or [N, 1, S, S], got {images.dtype} {tuple(images.shape)}")
    if images.dim() == 3:
        images = images[:, None]
    if len(targets) != len(images):
        raise ValueError(f"{len(targets)} targets for {len(images)} images")
    size = images.shape[-1]
    out = np.zeros((len(images), size, size), dtype=np.float32)
    was_training = net.training
    net.eval()
    try:
        for start in range(0, len(images), batch_size):
            stop = min(len(images), start + batch_size)
            x = model_input(images[start:stop], pixel_mean, pixel_std, device)
            demo = None if demographics is None else demographics[start:stop]
            maps = class_activation_maps(net, x, targets[start:stop], method=method, demographics=demo)
            out[start:stop] = upsample(maps, size).cpu().numpy()
    finally:
        net.train(was_training)
    return out


def heatmap(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    finding_index: int,
    *,
    method: str | None = None,
    pixel_mean: float,
    pixel_std: float,
    device: str | torch.device = "cpu",
    demographics: torch.Tensor | None = None,
) -> np.ndarray:
    """The heatmap ``float32[S, S]`` in [0, 1] of one finding on one uint8 store image ``[S, S]``."""
    image = torch.as_tensor(np.require(image, requirements="W") if isinstance(image, np.ndarray) else image)
    demo = None if demographics is None else torch.as_tensor(demographics).reshape(1, -1)
    return heatmaps(
        model, image[None], [finding_index], method=method, pixel_mean=pixel_mean, pixel_std=pixel_std,
        device=device, demographics=demo,
    )[0]  # fmt: skip


# --- the ETL's geometry: pad to a centred square, resize -------------------------------------------


def square_geometry(orig_width: int, orig_height: int) -> tuple[int, int, int]:
    """(side, left, top): the padded square's side and where the original sits in it, exactly as
    :func:`cxrflow.data.imaging.pad_square` places it."""
    w, h = int(orig_width), int(orig_height)
    if w < 1 or h < 1:
        raise ValueError(f"image dimensions must be positive, got {w}x{h}")
    side = max(w, h)
    return side, (side - w) // 2, (side - h) // 2


def store_to_original(x: np.ndarray | float, y: np.ndarray | float, size: int, orig_width: int, orig_height: int):
    """Store-image coordinates (pixel edges, 0..size) to original-image coordinates (0..width/height)."""
    side, left, top = square_geometry(orig_width, orig_height)
    scale = side / int(size)
    return np.asarray(x, dtype=np.float64) * scale - left, np.asarray(y, dtype=np.float64) * scale - top


def original_to_store(x: np.ndarray | float, y: np.ndarray | float, size: int, orig_width: int, orig_height: int):
    """The inverse of :func:`store_to_original`."""
    side, left, top = square_geometry(orig_width, orig_height)
    scale = int(size) / side
    return (np.asarray(x, dtype=np.float64) + left) * scale, (np.asarray(y, dtype=np.float64) + top) * scale


def to_original(heat: np.ndarray, orig_width: int, orig_height: int) -> np.ndarray:
    """A store-resolution map ``[S, S]`` on the original image's pixel grid ``float32[height, width]``:
    upsampled (bilinear) to the padded square, then the padding cropped away."""
    side, left, top = square_geometry(orig_width, orig_height)
    t = torch.as_tensor(np.asarray(heat, dtype=np.float32))[None, None]
    up = F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False)[0, 0]
    return up[top : top + int(orig_height), left : left + int(orig_width)].numpy().copy()


def original_extent(orig_width: int, orig_height: int) -> tuple[float, float, float, float]:
    """matplotlib ``extent`` (left, right, bottom, top) that draws a store image in original-image
    coordinates (crop with ``xlim(0, width)``, ``ylim(height, 0)``)."""
    side, left, top = square_geometry(orig_width, orig_height)
    return (-left, side - left, side - top, -top)
