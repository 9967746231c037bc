"""The model registry: one :class:`ModelEntry` per architecture says everything the pipeline needs.

An entry carries the builder of the backbone (images ``[N, 3, S, S]`` -> pooled features ``[N, F]``),
the class-activation layer and the heatmap method faithful to its head, how to switch activation
checkpointing (if it can), whether it trains in two stages (knowledge transfer, then fine-tuning)
or one, its ImageNet weights (a torchvision weights enum member, whose URL is the source), its
display title and whether it may fuse demographics. :func:`cxrflow.modelling.models.create_model`,
the training config, the heatmaps and the reports read the entry; adding a model is one
:func:`register_model` call, as in timm.

This module imports no torch at import time (the builders import it when called), so the report's
titles and the training config's checks stay light.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cxrflow.errors import CxrflowError

if TYPE_CHECKING:
    from torch import nn

#: Heatmap methods an entry may name (see :mod:`cxrflow.modelling.heatmaps`).
CAM_METHODS = ("gradcam", "hirescam")


@dataclass(frozen=True)
class CamSpec:
    """Where a model's class-activation maps are taken (a submodule path of ChestClassifier) and
    the method that is faithful to its head: ``hirescam`` where the head weighs grid positions
    separately (simple_cnn flattens an 8x8 grid), ``gradcam`` after global average pooling."""

    layer: str
    method: str


@dataclass(frozen=True)
class ModelEntry:
    """What one registered model is and can do."""

    #: the name given to ``--model`` and saved in configs and checkpoints
    name: str
    #: how reports and tables name it ("DenseNet-121")
    title: str
    #: () -> (backbone mapping [N, 3, S, S] to [N, F], F), randomly initialised
    build: Callable[[], tuple[nn.Module, int]]
    #: class-activation layer and its faithful heatmap method
    cam: CamSpec
    #: (backbone, enable) -> None, switching activation checkpointing; None: not supported
    grad_checkpointing: Callable[[nn.Module, bool], None] | None = None
    #: True: knowledge transfer (head only) then fine-tuning; False: one all-trainable stage
    two_stage: bool = True
    #: torchvision weights enum member (``"DenseNet121_Weights.IMAGENET1K_V1"``); None: no ImageNet weights
    imagenet_weights: str | None = None
    #: whether the model may fuse demographics (age, sex, view) before its head
    demographics: bool = True
    #: maps an older spelling of a backbone state-dict key to today's (None: keys never changed)
    legacy_key: Callable[[str], str] | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"a model name is letters, digits, '_' and '-', got {self.name!r}")
        if self.cam.method not in CAM_METHODS:
            raise ValueError(
                f"{self.name}: heatmap method must be one of {', '.join(CAM_METHODS)}, got {self.cam.method!r}"
            )


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry, *, replace: bool = False) -> ModelEntry:
    """Add ``entry`` to the registry (a name already taken is refused unless ``replace``)."""
    if entry.name in _REGISTRY and not replace:
        raise ValueError(f"model {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def unregister_model(name: str) -> None:
    """Remove a registered model (for tests and plug-ins that register one for a while)."""
    _REGISTRY.pop(name, None)


def model_names() -> tuple[str, ...]:
    """The registered model names, in registration order."""
    return tuple(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    """The entry of ``name``; an unknown name is a CxrflowError listing the registered ones."""
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        raise CxrflowError(f"unknown model {name!r}; choose one of {', '.join(_REGISTRY)}")
    return entry


def model_title(name: str) -> str:
    """The display title of a registered model; an unknown name (an old run's) is shown as is."""
    entry = _REGISTRY.get(name)
    return entry.title if entry is not None else str(name)


def checkpointing_models() -> tuple[str, ...]:
    """The registered models that support activation checkpointing."""
    return tuple(n for n, e in _REGISTRY.items() if e.grad_checkpointing is not None)


# --- the built-in models -----------------------------------------------------------------------


def _simple_cnn() -> tuple[nn.Module, int]:
    from cxrflow.modelling.backbones import SimpleCNN

    net = SimpleCNN()
    return net, net.num_features


def _resnet50() -> tuple[nn.Module, int]:
    from torch import nn
    from torchvision import models as tvm

    net = tvm.resnet50(weights=None)
    n = net.fc.in_features
    net.fc = nn.Identity()
    return net, n


def _densenet121() -> tuple[nn.Module, int]:
    from torch import nn
    from torchvision import models as tvm

    net = tvm.densenet121(weights=None)
    n = net.classifier.in_features
    net.classifier = nn.Identity()
    return net, n


def _resnet_checkpointing(net: nn.Module, enable: bool) -> None:
    from cxrflow.modelling.backbones import checkpoint_resnet

    checkpoint_resnet(net, enable)


def _densenet_checkpointing(net: nn.Module, enable: bool) -> None:
    from cxrflow.modelling.backbones import checkpoint_densenet

    checkpoint_densenet(net, enable)


#: torchvision's DenseNet files use ``norm.1``-style names of before PyTorch 0.4.
DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def old_densenet_key(key: str) -> str:
    """``...denselayer1.norm.1.weight`` (before PyTorch 0.4) -> ``...denselayer1.norm1.weight``."""
    m = DENSENET_OLD_KEY.match(key)
    return m.group(1) + m.group(2) if m else key


register_model(ModelEntry(
    "simple_cnn", "Simple CNN", _simple_cnn,
    CamSpec("backbone.features.6", "hirescam"),  # second conv block's ReLU, before the 8x8 grid
    two_stage=False,
))  # fmt: skip
register_model(ModelEntry(
    "resnet50", "ResNet-50", _resnet50,
    CamSpec("backbone.layer4", "gradcam"),  # last residual stage
    grad_checkpointing=_resnet_checkpointing, imagenet_weights="ResNet50_Weights.IMAGENET1K_V2",
))  # fmt: skip
register_model(ModelEntry(
    "densenet121", "DenseNet-121", _densenet121,
    CamSpec("backbone.features.norm5", "gradcam"),  # last dense block, normalised
    grad_checkpointing=_densenet_checkpointing, imagenet_weights="DenseNet121_Weights.IMAGENET1K_V1",
    legacy_key=old_densenet_key,
))  # fmt: skip
