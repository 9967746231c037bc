"""Classifiers built by name, all with the same face: ``backbone`` -> pooled features -> ``head``.

``create_model("densenet121", 14, pretrained="imagenet")`` returns a :class:`ChestClassifier` whose
``backbone`` maps ``[N, 3, S, S]`` images to ``[N, F]`` pooled features and whose ``head`` is a new
``Linear(F, K)``. Training code freezes "the backbone" without knowing the architecture. Models
return logits; the sigmoid belongs to the loss (``BCEWithLogitsLoss``) and to prediction.

Any model can fuse demographics (``fusion="demographics"``): a small embedding of age, sex and view
(:mod:`cxrflow.demographics`) is concatenated with the pooled features before the head, so the
head is ``Linear(F + E, K)``; every model is called ``model(x, demographics=None)`` and an
image-only model ignores them. Freezing the backbone leaves head and fusion layers trainable.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.error
from pathlib import Path
from typing import Callable

import torch
import torch.utils.checkpoint
from torch import nn
from torchvision import models as tvm

from cxrflow.demographics import DemographicsEmbedding, check_fusion
from cxrflow.errors import CxrflowError


class ChestClassifier(nn.Module):
    """Backbone (images -> pooled feature vector) plus a linear head (features -> K logits).

    ``freeze_backbone(True)`` stops gradients into the backbone and keeps it in eval mode even when
    ``train()`` is called, so BatchNorm running statistics stay frozen too (the "kt" stage).
    """

    def __init__(
        self, name: str, backbone: nn.Module, num_features: int, num_classes: int, fusion: nn.Module | None = None
    ):
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.num_features = num_features
        #: None (image only) or a module mapping demographics [N, 3] to [N, E] (``out_features``).
        self.fusion = fusion
        self.head = nn.Linear(self.head_features, num_classes)
        self.backbone_frozen = False

    @property
    def head_features(self) -> int:
        """Inputs of the head: pooled features plus the demographics embedding, if any."""
        return self.num_features + (self.fusion.out_features if self.fusion is not None else 0)

    @property
    def uses_demographics(self) -> bool:
        return self.fusion is not None

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[N, F]``."""
        return self.backbone(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, K]`` from pooled features."""
        return self.head(features)

    def forward(self, x: torch.Tensor, demographics: torch.Tensor | None = None) -> torch.Tensor:
        features = self.forward_features(x)
        if self.fusion is not None:
            if demographics is None:
                raise CxrflowError(f"this {self.name} model fuses demographics: it needs age, sex and view")
            features = torch.cat([features, self.fusion(demographics.to(features.device)).to(features.dtype)], dim=1)
        return self.forward_head(features)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a freshly initialised ``Linear(F [+ E], num_classes)``."""
        old = self.head.weight
        self.head = nn.Linear(self.head_features, num_classes).to(device=old.device, dtype=old.dtype)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone activations in the backward pass instead of keeping them (less memory)."""
        if self.name not in _CHECKPOINTING:
            raise CxrflowError(
                f"{self.name} has no activation checkpointing; it is available for {', '.join(_CHECKPOINTING)}"
            )
        _CHECKPOINTING[self.name](self.backbone, enable)

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) every backbone parameter and its BatchNorm statistics."""
        self.backbone_frozen = frozen
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        for p in self.trainable_on_top().parameters():
            p.requires_grad_(True)
        self.train(self.training)

    def trainable_on_top(self) -> nn.Module:
        """What knowledge transfer trains: the head, and the fusion layers when there are any."""
        return nn.ModuleList([self.head] + ([self.fusion] if self.fusion is not None else []))

    def train(self, mode: bool = True) -> "ChestClassifier":
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self


# --- architectures -------------------------------------------------------------------------------


class SimpleCNN(nn.Module):
    """The paper's baseline feature extractor: two conv blocks, then a fixed 8x8 grid, flattened.

    Adaptive pooling to a fixed grid keeps the layout information a flattening layer would keep,
    at any input size.
    """

    grid = 8

    def __init__(self, channels: tuple[int, int] = (16, 32)):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(self.grid),
            nn.Flatten(),
        )
        self.num_features = c2 * self.grid * self.grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _simple_cnn(pretrained: str, download: bool) -> tuple[nn.Module, int]:
    if pretrained == "imagenet":
        raise CxrflowError("simple_cnn has no ImageNet weights; use --pretrained none or a weights file")
    net = SimpleCNN()
    return net, net.num_features


def _resnet50(pretrained: str, download: bool) -> tuple[nn.Module, int]:
    weights = _imagenet_weights(tvm.ResNet50_Weights.IMAGENET1K_V2, download) if pretrained == "imagenet" else None
    net = _build(tvm.resnet50, weights)
    n = net.fc.in_features
    net.fc = nn.Identity()
    return net, n


def _densenet121(pretrained: str, download: bool) -> tuple[nn.Module, int]:
    weights = _imagenet_weights(tvm.DenseNet121_Weights.IMAGENET1K_V1, download) if pretrained == "imagenet" else None
    net = _build(tvm.densenet121, weights)
    n = net.classifier.in_features
    net.classifier = nn.Identity()
    return net, n


#: name -> builder(pretrained, download) returning (backbone producing [N, F], F).
_BUILDERS: dict[str, Callable[[str, bool], tuple[nn.Module, int]]] = {
    "simple_cnn": _simple_cnn,
    "resnet50": _resnet50,
    "densenet121": _densenet121,
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


# --- activation checkpointing --------------------------------------------------------------------


class CheckpointedSequential(nn.Sequential):
    """An ``nn.Sequential`` that, while gradients are wanted, recomputes each block's activations in
    the backward pass (``torch.utils.checkpoint``) instead of storing them. Same children, same
    state-dict keys as the ``nn.Sequential`` it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        for block in self:
            if x.requires_grad or any(p.requires_grad for p in block.parameters()):
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def _resnet_checkpointing(net: nn.Module, enable: bool) -> None:
    """Checkpoint every bottleneck block of layer1..layer4."""
    kind = CheckpointedSequential if enable else nn.Sequential
    for name in ("layer1", "layer2", "layer3", "layer4"):
        setattr(net, name, kind(*getattr(net, name)))


def _densenet_checkpointing(net: nn.Module, enable: bool) -> None:
    """torchvision's own memory-efficient DenseNet: each dense layer recomputes its concatenation
    and bottleneck (the part whose memory grows quadratically with depth)."""
    for module in net.modules():
        if isinstance(module, tvm.densenet._DenseLayer):
            module.memory_efficient = enable


#: name -> switch(backbone, enable) for the models that support activation checkpointing.
_CHECKPOINTING: dict[str, Callable[[nn.Module, bool], None]] = {
    "resnet50": _resnet_checkpointing,
    "densenet121": _densenet_checkpointing,
}
CHECKPOINTING_MODELS: tuple[str, ...] = tuple(_CHECKPOINTING)
#: Names of the original torchvision classifier, dropped when a torchvision state dict is loaded.
_TORCHVISION_HEADS = ("fc.", "classifier.")


def _build(factory: Callable[..., nn.Module], weights) -> nn.Module:
    try:
        return factory(weights=weights, progress=False)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise CxrflowError(_missing_weights_message(weights, f"download failed ({exc})")) from None
    except Exception as exc:  # unpickling/shape errors of a damaged cache file come in many types
        raise CxrflowError(
            f"cached ImageNet weights cannot be loaded ({str(exc).splitlines()[0][:200]}); delete the file and "
            f"place a fresh copy of {weights.url} there",
            _weights_cache_file(weights),
        ) from None


def _weights_cache_file(weights) -> Path:
    """Where torchvision looks for (and stores) this weight enum's file: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _missing_weights_message(weights, why: str) -> str:
    target = _weights_cache_file(weights)
    return (
        f"ImageNet weights {weights} are not cached and {why}: download {weights.url} and place it at "
        f"{target} (the folder follows $TORCH_HOME, now {os.environ.get('TORCH_HOME', 'unset')})"
    )


def _imagenet_weights(weights, download: bool):
    """The weight enum, once its file is cached; tries a bounded download only when allowed."""
    if _weights_cache_file(weights).is_file():
        return weights
    if not download:
        raise CxrflowError(_missing_weights_message(weights, "downloading is disabled"))
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20.0)
    try:
        torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=False)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise CxrflowError(_missing_weights_message(weights, f"download failed ({exc})")) from None
    finally:
        socket.setdefaulttimeout(previous)
    return weights


# --- loading weights from files -------------------------------------------------------------------

_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _normalise_keys(state: dict[str, torch.Tensor], name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a saved state dict onto ChestClassifier's keys; returns it and the dropped head keys."""
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    ours = any(k.startswith(("backbone.", "head.")) for k in state)
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        if name == "densenet121":
            m = _DENSENET_OLD_KEY.match(key.removeprefix("backbone."))
            if m:
                key = ("backbone." if key.startswith("backbone.") else "") + m.group(1) + m.group(2)
        if not ours:
            if key.startswith(_TORCHVISION_HEADS):
                dropped.append(key)
                continue
            key = "backbone." + key
        out[key] = value
    return out, dropped


def _load_weights_file(model: ChestClassifier, path: str) -> list[str]:
    """Load backbone (and, when shapes match, head) weights from a file; returns notes for the log."""
    file = Path(path)
    if not file.is_file():
        raise CxrflowError("no such weights file (expected 'imagenet', 'none' or a state dict file)", file)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types; all mean "not a weights file"
        raise CxrflowError(f"not a loadable PyTorch state dict: {exc}".splitlines()[0], file) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # a cxrflow checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CxrflowError("the file does not hold a state dict (name -> tensor)", file)
    state, dropped = _normalise_keys(obj, model.name)
    notes = []
    if dropped:
        notes.append(f"ignored {len(dropped)} keys of the original classifier ({', '.join(dropped[:3])})")
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    fusion = {k.removeprefix("fusion."): v for k, v in state.items() if k.startswith("fusion.")}
    body = {k: v for k, v in state.items() if not k.startswith(("head.", "fusion."))}
    expected = model.backbone.state_dict()
    # files saved before PyTorch 0.4 (torchvision's DenseNet) lack BatchNorm's batch counters
    missing = sorted(k for k in expected if "backbone." + k not in body and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k.removeprefix("backbone.") for k in body if k.removeprefix("backbone.") not in expected)
    wrong = sorted(
        k for k in expected if "backbone." + k in body and body["backbone." + k].shape != expected[k].shape
    )
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
                parts.append(f"{len(keys)} {label} keys ({', '.join(keys[:5])}{more})")
        raise CxrflowError(f"weights do not fit a {model.name} backbone: " + "; ".join(parts), file)
    model.backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in body.items()}, strict=False)
    if head and all(
        k.removeprefix("head.") in model.head.state_dict()
        and model.head.state_dict()[k.removeprefix("head.")].shape == v.shape
        for k, v in head.items()
    ) and len(head) == len(model.head.state_dict()):
        model.head.load_state_dict({k.removeprefix("head."): v for k, v in head.items()})
        notes.append("loaded backbone and head")
    else:
        notes.append("loaded backbone; head newly initialised" + (" (shape differs)" if head else ""))
    if model.fusion is not None and fusion:
        ours = model.fusion.state_dict()
        if fusion.keys() == ours.keys() and all(ours[k].shape == v.shape for k, v in fusion.items()):
            model.fusion.load_state_dict(fusion)
            notes.append("loaded fusion layers")
    return notes


def create_model(
    name: str,
    num_classes: int,
    pretrained: str = "none",
    *,
    download: bool = True,
    fusion: str = "none",
    grad_checkpointing: bool = False,
) -> ChestClassifier:
    """Build a registered model with a new ``num_classes`` head.

    ``pretrained``: ``"none"`` (random init), ``"imagenet"`` (torchvision weights from the
    ``$TORCH_HOME`` cache, downloaded only when ``download`` and the network allow) or a path to a
    state dict (torchvision-style, a ChestClassifier's, or a cxrflow checkpoint).
    ``fusion``: ``"none"`` or ``"demographics"`` (see :mod:`cxrflow.demographics`).
    ``grad_checkpointing``: activation checkpointing (models in :data:`CHECKPOINTING_MODELS`).
    """
    check_fusion(fusion)
    if name not in _BUILDERS:
        raise CxrflowError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if num_classes < 1:
        raise CxrflowError(f"a model needs at least one output, got num_classes={num_classes}")
    pretrained = str(pretrained)
    kind = pretrained if pretrained in ("none", "imagenet") else "file"
    backbone, num_features = _BUILDERS[name](kind, download)
    model = ChestClassifier(
        name, backbone, num_features, num_classes, DemographicsEmbedding() if fusion == "demographics" else None
    )
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.load_notes = []
    if kind == "file":
        model.load_notes = _load_weights_file(model, pretrained)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[ChestClassifier, dict]:
    """Rebuild the model stored in a cxrflow checkpoint; returns it (eval mode) and the checkpoint dict."""
    file = Path(path)
    if not file.is_file():
        raise CxrflowError("no such checkpoint", file)
    try:
        ckpt = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:  # see _load_weights_file
        raise CxrflowError(f"not a readable checkpoint: {exc}".splitlines()[0], file) from None
    if not isinstance(ckpt, dict) or not {"model", "config", "label_names"} <= set(ckpt):
        raise CxrflowError("not a cxrflow checkpoint (needs keys model, config, label_names)", file)
    name = ckpt["config"].get("model")
    model = create_model(name, len(ckpt["label_names"]), pretrained="none", fusion=ckpt["config"].get("fusion", "none"))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CxrflowError(f"checkpoint weights do not fit {name}: {exc}".splitlines()[0], file) from None
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    model.eval()
    return model, ckpt
