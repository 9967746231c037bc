"""Heatmaps: every registered model, both methods against hand-written gradients, float32, fused
models' demographics, and the ETL's pad-to-square geometry on non-square images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrflow.data.imaging import resize_gray
from cxrflow.errors import CxrflowError
from cxrflow.modelling.heatmaps import (
    cam_layer,
    cam_method,
    class_activation_maps,
    heatmap,
    heatmaps,
    original_to_store,
    store_to_original,
    to_original,
)
from cxrflow.modelling.models import CAM_SPECS, MODEL_NAMES, ChestClassifier, create_model
from cxrflow.results.localize import boxes_in_original

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    return {name: create_model(name, 3).eval() for name in MODEL_NAMES}


def test_every_model_names_its_layer_and_default_method(built):
    assert set(CAM_SPECS) == set(MODEL_NAMES)
    assert cam_method(built["simple_cnn"]) == "hirescam"
    assert cam_method(built["densenet121"]) == cam_method(built["resnet50"]) == "gradcam"
    assert isinstance(cam_layer(built["resnet50"]), torch.nn.Sequential)  # layer4
    with pytest.raises(CxrflowError, match="unknown heatmap method 'cam'"):
        cam_method(built["simple_cnn"], "cam")


def test_read_only_pixels_give_no_warning(built):
    """The report's case thumbnails come straight from Parquet buffers (read-only arrays); torch's
    "non-writable tensors" warning reached the user as a 'warning:' line of 'cxrflow report'."""
    import warnings

    image = np.frombuffer(np.random.default_rng(0).integers(0, 256, 32 * 32, dtype=np.uint8).tobytes(), np.uint8)
    image = image.reshape(32, 32)
    assert not image.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = heatmap(built["simple_cnn"], image, 1, pixel_mean=0.5, pixel_std=0.25)
        many = heatmaps(built["simple_cnn"], image[None], [1], pixel_mean=0.5, pixel_std=0.25)
    np.testing.assert_array_equal(one, many[0])


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_heatmap_shape_range_and_finite(built, name, method):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32), dtype=np.uint8)
    maps = heatmaps(built[name], images, [0, 2], method=method, pixel_mean=0.5, pixel_std=0.25)
    assert maps.shape == (2, 32, 32) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    one = heatmap(built[name], images[1], 2, method=method, pixel_mean=0.5, pixel_std=0.25)
    np.testing.assert_allclose(one, maps[1], atol=1e-5)


def _by_hand(model, x, target, layer_name):
    """Activation and gradient of the target logit at the layer, with a plain forward hook."""
    layer = model.get_submodule(layer_name)
    seen = {}
    handle = layer.register_forward_hook(lambda m, i, out: seen.setdefault("act", out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    act = seen["act"]
    (grad,) = torch.autograd.grad(logits[0, target], act)
    return act.detach(), grad


@pytest.mark.parametrize("name", ["simple_cnn", "resnet50"])
def test_methods_match_their_definitions(built, name):
    model = built[name]
    x = torch.randn(1, 3, 32, 32)
    act, grad = _by_hand(model, x, 1, CAM_SPECS[name].layer)
    hires = (grad * act).sum(1).clamp_min(0)[0]
    gradcam = (grad.mean(dim=(2, 3), keepdim=True) * act).sum(1).clamp_min(0)[0]
    np.testing.assert_allclose(class_activation_maps(model, x, [1], method="hirescam")[0], hires, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(class_activation_maps(model, x, [1], method="gradcam")[0], gradcam, rtol=1e-4, atol=1e-6)


def test_hirescam_sums_to_the_logit_for_simple_cnn(built):
    """Gradient x activation over a piecewise-linear path to the logit adds up to the logit less the bias."""
    model = built["simple_cnn"]
    x = torch.randn(1, 3, 32, 32)
    act, grad = _by_hand(model, x, 0, CAM_SPECS["simple_cnn"].layer)
    with torch.no_grad():
        logit = model(x)[0, 0]
    assert float((grad * act).sum().detach()) == pytest.approx(
        float(logit - model.head.bias[0].detach()), rel=1e-4, abs=1e-5
    )


def test_float32_inside_bf16_autocast(built):
    images = np.random.default_rng(1).integers(0, 256, (1, 32, 32), dtype=np.uint8)
    plain = heatmaps(built["simple_cnn"], images, [0], pixel_mean=0.5, pixel_std=0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = heatmaps(built["simple_cnn"], images, [0], pixel_mean=0.5, pixel_std=0.25)
    np.testing.assert_allclose(inside, plain, atol=1e-6)


class _Fused(ChestClassifier):
    """A stand-in for a demographics-fused model: it refuses to run without its demographics."""

    def forward(self, x, demographics=None):
        if demographics is None:
            raise TypeError("demographics are required")
        return self.forward_head(self.forward_features(x)) * demographics[:, :1]


def test_demographics_are_passed_and_held_fixed(built):
    plain = built["simple_cnn"]
    fused = _Fused("simple_cnn", plain.backbone, plain.num_features, 3).eval()
    fused.head.load_state_dict(plain.head.state_dict())
    images = np.random.default_rng(2).integers(0, 256, (2, 32, 32), dtype=np.uint8)
    demo = torch.tensor([[1.0, 0.3], [2.0, -1.0]])
    got = heatmaps(fused, images, [0, 0], pixel_mean=0.5, pixel_std=0.25, demographics=demo)
    ref = heatmaps(plain, images, [0, 0], pixel_mean=0.5, pixel_std=0.25)
    np.testing.assert_allclose(got, ref, atol=1e-5)  # a positive logit scale leaves the normalised map as it is
    with pytest.raises(TypeError, match="demographics are required"):
        heatmaps(fused, images, [0, 0], pixel_mean=0.5, pixel_std=0.25)


@pytest.mark.parametrize("width,height", [(120, 80), (70, 140), (96, 96)])
def test_geometry_through_pad_to_square(width, height):
    """A lesion at a known box of a non-square image, seen at the store size, maps back to that box."""
    gray = np.full((height, width), 40, np.uint8)
    box = (width // 5, height // 3, width // 4, height // 4)  # x, y, w, h
    gray[box[1] : box[1] + box[3], box[0] : box[0] + box[2]] = 250
    size = 48
    store = resize_gray(gray, size)
    x, y = store_to_original(*original_to_store(13.0, 7.0, size, width, height), size, width, height)
    assert (float(x), float(y)) == pytest.approx((13.0, 7.0))
    # the store image, used as a "heatmap", lands on the original's pixels
    back = to_original(store.astype(np.float32), width, height)
    assert back.shape == (height, width)
    assert back[box[1] + box[3] // 2, box[0] + box[2] // 2] > 200 and back[2, 2] < 60
    side = max(width, height)
    (found,) = boxes_in_original(store.astype(np.float32), width, height, (180,), max_boxes=1)
    tol = 1.5 * side / size  # a store pixel and a half, in original pixels
    assert found["x"] == pytest.approx(box[0], abs=tol) and found["y"] == pytest.approx(box[1], abs=tol)
    assert found["w"] == pytest.approx(box[2], abs=2 * tol) and found["h"] == pytest.approx(box[3], abs=2 * tol)
    assert 0 <= found["x"] and found["x"] + found["w"] <= width and found["y"] + found["h"] <= height
