"""The model registry: a model is one entry, and every part of the pipeline reads it.

A tiny model is registered inside the test only; with no other edit it builds, trains through the
real trainer, gets its class-activation layer and heatmaps, and its title in the report.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cxrflow.errors import CxrflowError
from cxrflow.modelling import models
from cxrflow.modelling.registry import (
    CamSpec,
    ModelEntry,
    checkpointing_models,
    model_entry,
    model_names,
    register_model,
    unregister_model,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _tiny_backbone() -> tuple[nn.Module, int]:
    """One convolution, ReLU, global average pooling: 4 features."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return net, 4


@pytest.fixture
def tiny():
    entry = ModelEntry(
        "tiny_test_cnn", "Tiny test CNN", _tiny_backbone, CamSpec("backbone.1", "gradcam"),
        two_stage=False, demographics=False,
    )  # fmt: skip
    register_model(entry)
    yield entry
    unregister_model(entry.name)
    assert entry.name not in model_names()


def test_built_in_entries_are_complete():
    assert model_names() == ("simple_cnn", "resnet50", "densenet121")
    assert checkpointing_models() == ("resnet50", "densenet121")
    for name in model_names():
        entry = model_entry(name)
        model = models.create_model(name, 3)
        assert isinstance(model.get_submodule(entry.cam.layer), nn.Module), name
        assert entry.two_stage == (entry.imagenet_weights is not None), name  # only simple_cnn trains in one stage
    with pytest.raises(CxrflowError, match="unknown model 'vgg16'; choose one of simple_cnn, resnet50, densenet121"):
        model_entry("vgg16")
    with pytest.raises(ValueError, match="already registered"):
        register_model(model_entry("resnet50"))
    with pytest.raises(ValueError, match="heatmap method"):
        ModelEntry("x", "X", _tiny_backbone, CamSpec("backbone.1", "cam"))


def test_a_new_model_is_one_entry(tiny, tmp_path):
    """Builds, passes the config's checks, trains one step, rebuilds from its checkpoint, gets heatmaps
    and a title: nothing but the entry names the model."""
    from cxrflow.modelling.config import StageSettings, TrainConfig
    from cxrflow.modelling.heatmaps import cam_layer, cam_method, heatmaps
    from cxrflow.modelling.train import train
    from cxrflow.results.table import model_title
    from cxrflow.testing.synthstore import write_synthetic_store

    name = tiny.name
    assert name in models.MODEL_NAMES and name in models.CAM_SPECS and name not in models.CHECKPOINTING_MODELS
    model = models.create_model(name, 14)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 14)
    with pytest.raises(CxrflowError, match="no ImageNet weights"):
        models.create_model(name, 14, pretrained="imagenet")
    with pytest.raises(CxrflowError, match="does not fuse demographics"):
        models.create_model(name, 14, fusion="demographics")

    store = tmp_path / "store"
    write_synthetic_store(store, sizes=(32,), rows={"train": 16, "val": 16, "test": 16}, prevalence=0.3)
    config = TrainConfig(
        store=str(store), size=32, model=name, out=str(tmp_path / "run"), pretrained="imagenet", batch_size=16,
        finetune=StageSettings(epochs=1, lr=1e-2), augment=False, device="cpu", early_stopping_patience=0,
    )  # fmt: skip
    config.validate()
    assert config.pretrained == "none"  # no ImageNet weights: the default does not apply
    assert [s.name for s in config.stages()] == ["finetune"]  # a single-stage entry
    for bad, message in (({"stage": "kt"}, "no kt stage"), ({"grad_checkpointing": True}, "grad-checkpointing"),
                         ({"fusion": "demographics"}, "does not fuse demographics")):  # fmt: skip
        with pytest.raises(CxrflowError, match=message):
            TrainConfig(**{**config.to_dict(), "kt": config.kt, "finetune": config.finetune, **bad}).validate()

    steps: list[tuple[str, int, int]] = []
    train(
        config,
        quiet=True,
        log=lambda msg: None,
        step_hook=lambda m, stage, epoch, step: steps.append((stage, epoch, step)),
    )
    assert len(steps) == 1 and steps[0][0] == "finetune"
    trained, ckpt = models.load_checkpoint(tmp_path / "run" / "best_finetune.pt")
    assert trained.name == name and ckpt["config"]["model"] == name
    assert not torch.equal(trained.backbone[0].weight, models.create_model(name, 14).backbone[0].weight)

    assert cam_layer(trained) is trained.backbone[1] and cam_method(trained) == "gradcam"
    images = torch.randint(0, 256, (2, 32, 32), dtype=torch.uint8)
    maps = heatmaps(trained, images, [0, 3], pixel_mean=0.5, pixel_std=0.25)
    assert maps.shape == (2, 32, 32) and maps.min() >= 0 and maps.max() <= 1

    assert model_title(name) == "Tiny test CNN"
    assert model_title(name, "demographics") == "Tiny test CNN + demographics"


def test_the_documented_entry_registers_a_working_model():
    """docs/model-registry.md's example, run as written: the model builds, maps and has a title."""
    import re
    from pathlib import Path

    from cxrflow.modelling.heatmaps import cam_layer
    from cxrflow.results.table import model_title

    doc = Path(__file__).resolve().parents[2] / "docs" / "model-registry.md"
    (block,) = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.DOTALL)
    try:
        exec(compile(block, str(doc), "exec"), {})  # noqa: S102 (the documented code as written)
        model = models.create_model("efficientnet_b0", 3).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
        assert isinstance(cam_layer(model), nn.Sequential) and model_title("efficientnet_b0") == "EfficientNet-B0"
        assert models._weights_enum(model_entry("efficientnet_b0").imagenet_weights).url.endswith(".pth")
    finally:
        unregister_model("efficientnet_b0")
