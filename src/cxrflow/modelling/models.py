"""Classifiers built by name, all with the same face: ``backbone`` -> pooled features -> ``head``.

What a name builds, and what it can do, is its entry in :mod:`cxrflow.modelling.registry`; this
module only assembles entries into :class:`ChestClassifier` and loads weights, so it never branches
on a model's name.

``create_model("densenet121", 14, pretrained="imagenet")`` returns a :class:`ChestClassifier` whose
``backbone`` maps ``[N, 3, S, S]`` images to ``[N, F]`` pooled features and whose ``head`` is a new
``Linear(F, K)``. Training code freezes "the backbone" without knowing the architecture. Models
return logits; the sigmoid belongs to the loss (``BCEWithLogitsLoss``) and to prediction.

A model whose registry entry allows it fuses demographics (``fusion="demographics"``): a per-finding logistic term on age, sex
and view (:mod:`cxrflow.modelling.fusion`) is added to the head's logits ("wide and deep"), so the
head stays ``Linear(F, K)``; every model is called ``model(x, demographics=None)`` and an
image-only model ignores them. Freezing the backbone leaves head and fusion term trainable.
"""

from __future__ import annotations

import math
import os
import re
import socket
import urllib.error
import warnings
from pathlib import Path

import torch
from torch import nn

from cxrflow import safeio
from cxrflow.data.demographics import check_fusion
from cxrflow.data.imaging import MAX_STORE_SIZE
from cxrflow.errors import CxrflowError
from cxrflow.modelling.backbones import CheckpointedSequential, SimpleCNN  # noqa: F401 (their old home)
from cxrflow.modelling.fusion import make_fusion
from cxrflow.modelling.registry import CamSpec, ModelEntry, checkpointing_models, model_entry, model_names  # noqa: F401


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
        #: None (image only) or a module mapping demographics [N, 3] to logits [N, K] added to the head's.
        self.fusion = fusion
        self.head = nn.Linear(self.head_features, num_classes)
        self.backbone_frozen = False

    @property
    def head_features(self) -> int:
        """Inputs of the head: the pooled features (the demographic term is added to its logits)."""
        return self.num_features

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
            return self.forward_head(features) + self.fusion(demographics.to(features.device)).to(features.dtype)
        return self.forward_head(features)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head (and an unfitted demographic term) by freshly initialised ones for ``num_classes``."""
        old = self.head.weight
        self.head = nn.Linear(self.head_features, num_classes).to(device=old.device, dtype=old.dtype)
        if self.fusion is not None:
            self.fusion = make_fusion(num_classes).to(device=old.device, dtype=old.dtype)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone activations in the backward pass instead of keeping them (less memory)."""
        switch = model_entry(self.name).grad_checkpointing
        if switch is None:
            raise CxrflowError(
                f"{self.name} has no activation checkpointing; it is available for {', '.join(checkpointing_models())}"
            )
        switch(self.backbone, enable)

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

    def train(self, mode: bool = True) -> ChestClassifier:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self


# --- the registry, seen from here ------------------------------------------------------------------


def __getattr__(name: str):
    """``MODEL_NAMES``, ``CAM_SPECS`` and ``CHECKPOINTING_MODELS``: live views of the registry
    (:mod:`cxrflow.modelling.registry`), so a model registered later is in them too."""
    if name == "MODEL_NAMES":
        return model_names()
    if name == "CAM_SPECS":
        return {n: model_entry(n).cam for n in model_names()}
    if name == "CHECKPOINTING_MODELS":
        return checkpointing_models()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: Names of the original torchvision classifier, dropped when a torchvision state dict is loaded.
_TORCHVISION_HEADS = ("fc.", "classifier.")


def _weights_enum(spec: str):
    """The torchvision weights enum member an entry names (``"DenseNet121_Weights.IMAGENET1K_V1"``)."""
    from torchvision import models as tvm

    kind, _, member = spec.partition(".")
    weights = getattr(getattr(tvm, kind, None), member, None)
    if weights is None:
        raise CxrflowError(f"this torchvision has no weights {spec}; update torchvision or the model's registry entry")
    return weights


def _load_imagenet(backbone: nn.Module, entry: ModelEntry, weights) -> None:
    """Load ``weights``' cached ImageNet file into a freshly built backbone (its classifier dropped)."""
    file = _weights_cache_file(weights)
    state = load_cached_weights(file)
    expected = backbone.state_dict()
    fix = entry.legacy_key or (lambda key: key)
    state = {fix(k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in expected or not k.startswith(_TORCHVISION_HEADS)}
    try:
        backbone.load_state_dict(state)
    except RuntimeError as exc:
        raise CxrflowError(
            f"cached ImageNet weights do not fit {entry.name}: {_mismatch(expected, state)}; delete the "
            f"file and place a fresh copy of {weights.url} there",
            file,
        ) from exc


#: torchvision's weight files are named ``<name>-<first hex digits of their sha256>.pth``.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,64})\.")


def load_cached_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A torchvision weights file as a state dict: its sha256 must start with the digits in its
    name, and it is read with ``weights_only=True`` (a planted pickle is refused, never run)."""
    import hashlib

    file = Path(path)
    match = _HASH_IN_NAME.search(file.name)
    if match is None:
        raise CxrflowError("weights file name carries no hash (expected <name>-<sha256 prefix>.pth)", file)
    digest = hashlib.sha256()
    with safeio.open_regular(file, "weights file") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(match.group(1)):
        raise CxrflowError(
            f"weights file does not match the hash in its name (sha256 {digest.hexdigest()[:12]}..., name says "
            f"{match.group(1)}); it is damaged or was replaced: delete it and download it again",
            file,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on pickle protocols would precede the error line
            state = torch.load(safeio.regular_file(file, "weights file"), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not plain tensors"
        raise CxrflowError(f"weights file is not a plain state dict: {str(exc).splitlines()[0][:200]}", file) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CxrflowError("weights file does not hold a state dict (name -> tensor)", file)
    return state


def _mismatch(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str:
    """Which layers differ between two state dicts: missing, unexpected, wrong shape (a few of each)."""
    missing = sorted(k for k in expected if k not in got and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in got if k not in expected)
    wrong = sorted(k for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape))
    parts = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shape", wrong)):
        if keys:
            shown = [
                f"{k} {tuple(got[k].shape)} vs {tuple(expected[k].shape)}" if label == "wrong shape" else k
                for k in keys[:4]
            ]
            more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
            parts.append(f"{len(keys)} {label} ({', '.join(shown)}{more})")
    return "; ".join(parts) or "no layer differs"


def _weights_cache_file(weights) -> Path:
    """Where torchvision looks for (and stores) this weight enum's file: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _missing_weights_message(weights, why: str) -> str:
    target = _weights_cache_file(weights)
    return (
        f"ImageNet weights {weights} are not cached and {why}: download {weights.url} and place it at "
        f"{target} (the folder follows $TORCH_HOME, now {os.environ.get('TORCH_HOME', 'unset')}); the backbone then "
        "starts from ImageNet features (the paper's knowledge transfer: a better AUC sooner on real X-rays). "
        "Or pass --pretrained none: random initial weights, no file needed, but more epochs to learn the same"
    )


def _imagenet_weights(weights, download: bool):
    """The weight enum, once its file is cached; tries a bounded download only when allowed."""
    if _weights_cache_file(weights).is_file():
        return weights
    if not download:
        raise CxrflowError(_missing_weights_message(weights, "downloading is disabled"))
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20.0)
    target = _weights_cache_file(weights)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        match = _HASH_IN_NAME.search(target.name)
        torch.hub.download_url_to_file(weights.url, str(target), match.group(1) if match else None, progress=False)
    except (urllib.error.URLError, OSError, TimeoutError, RuntimeError) as exc:
        raise CxrflowError(_missing_weights_message(weights, f"download failed ({exc})")) from None
    finally:
        socket.setdefaulttimeout(previous)
    return weights


# --- loading weights from files -------------------------------------------------------------------


def _normalise_keys(state: dict[str, torch.Tensor], name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a saved state dict onto ChestClassifier's keys; returns it and the dropped head keys."""
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    fix = model_entry(name).legacy_key
    ours = any(k.startswith(("backbone.", "head.")) for k in state)
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        if fix is not None:
            inner = fix(key.removeprefix("backbone."))
            key = ("backbone." if key.startswith("backbone.") else "") + inner
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
        obj = torch.load(safeio.regular_file(file, "weights file"), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types; all mean "not a weights file"
        raise CxrflowError(f"not a loadable PyTorch state dict: {exc}".splitlines()[0], file) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # a cxrflow checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CxrflowError("the file does not hold a state dict (name -> tensor)", file)
    check_finite(obj, file)
    state, dropped = _normalise_keys(obj, model.name)
    notes = []
    if dropped:
        notes.append(f"ignored {len(dropped)} keys of the original classifier ({', '.join(dropped[:3])})")
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    fusion = {k.removeprefix("fusion."): v for k, v in state.items() if k.startswith("fusion.")}
    body = {k: v for k, v in state.items() if not k.startswith(("head.", "fusion."))}
    expected = model.backbone.state_dict()
    got = {k.removeprefix("backbone."): v for k, v in body.items()}
    # files saved before PyTorch 0.4 (torchvision's DenseNet) lack BatchNorm's batch counters
    if any(k not in got and not k.endswith("num_batches_tracked") for k in expected) or any(
        k not in expected or got[k].shape != expected[k].shape for k in got
    ):
        raise CxrflowError(f"weights do not fit a {model.name} backbone: {_mismatch(expected, got)}", file)
    model.backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in body.items()}, strict=False)
    if (
        head
        and all(
            k.removeprefix("head.") in model.head.state_dict()
            and model.head.state_dict()[k.removeprefix("head.")].shape == v.shape
            for k, v in head.items()
        )
        and len(head) == len(model.head.state_dict())
    ):
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
    ``fusion``: ``"none"`` or ``"demographics"`` (see :mod:`cxrflow.data.demographics`).
    ``grad_checkpointing``: activation checkpointing (entries with a ``grad_checkpointing`` switch).
    """
    check_fusion(fusion)
    entry = model_entry(name)
    if num_classes < 1:
        raise CxrflowError(f"a model needs at least one output, got num_classes={num_classes}")
    if fusion != "none" and not entry.demographics:
        raise CxrflowError(f"{name} does not fuse demographics; use --fusion none")
    pretrained = str(pretrained)
    kind = pretrained if pretrained in ("none", "imagenet") else "file"
    weights = None
    if kind == "imagenet":
        if entry.imagenet_weights is None:
            raise CxrflowError(f"{name} has no ImageNet weights; use --pretrained none or a weights file")
        weights = _imagenet_weights(_weights_enum(entry.imagenet_weights), download)
    backbone, num_features = entry.build()
    if weights is not None:
        _load_imagenet(backbone, entry, weights)
    model = ChestClassifier(
        name, backbone, num_features, num_classes, make_fusion(num_classes) if fusion == "demographics" else None
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


def check_finite(state: dict, source: str | os.PathLike) -> None:
    """One CxrflowError naming ``source`` and the first tensors of ``state`` holding NaN or infinite
    values: such weights score every image as NaN (``null`` probabilities, an AUC that cannot be
    computed), so a damaged file is refused where it is loaded, not discovered in the results."""
    floats = {name: t for name, t in state.items() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if not floats:
        return
    try:  # one fused pass (as clip_grad_norm_ does): a NaN or infinity makes its tensor's norm non-finite
        norms = torch.stack([n.float() for n in torch._foreach_norm([t.detach() for t in floats.values()])])
        if bool(torch.isfinite(norms).all()):
            return
    except (AttributeError, RuntimeError):  # no fused norm here: the per-tensor test below decides
        pass
    bad = [name for name, t in floats.items() if not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CxrflowError(
            f"the weights hold NaN or infinite values ({', '.join(bad[:3])}{more}): the file is damaged "
            "(or training diverged); use another checkpoint or train again",
            source,
        )


def load_weights(model: ChestClassifier, state: dict, source: str | os.PathLike) -> None:
    """``model.load_state_dict(state)``, or one CxrflowError naming ``source`` and the layers that differ
    (or hold NaN / infinite values, :func:`check_finite`)."""
    if not isinstance(state, dict):
        raise CxrflowError("checkpoint field 'model' must be a state dict (name -> tensor)", source)
    check_finite(state, source)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise CxrflowError(
            f"checkpoint weights do not fit {model.name} with {model.num_classes} findings: "
            f"{_mismatch(model.state_dict(), state)}",
            source,
        ) from None


def _check_checkpoint(ckpt: dict, file: Path) -> None:
    """One CxrflowError naming the checkpoint field that does not have the expected shape."""
    config, names, state = ckpt["config"], ckpt["label_names"], ckpt["model"]
    if not isinstance(config, dict):
        raise CxrflowError(f"checkpoint field 'config' must be a mapping, got {type(config).__name__}", file)
    if config.get("model") not in model_names():
        raise CxrflowError(
            f"checkpoint field 'config.model' must be one of {', '.join(model_names())}, got {config.get('model')!r}",
            file,
        )
    size = config.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_STORE_SIZE):
        raise CxrflowError(
            f"checkpoint field 'config.size' must be a positive integer of at most {MAX_STORE_SIZE} (the largest size a store holds), got {size!r}",
            file,
        )
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise CxrflowError(
            f"checkpoint field 'label_names' must be a non-empty list of names, got {names!r}"[:200], file
        )
    if len(set(names)) != len(names):
        raise CxrflowError(f"checkpoint field 'label_names' names a finding twice: {names!r}"[:200], file)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CxrflowError("checkpoint field 'model' must be a state dict (name -> tensor)", file)
    for key in ("pixel_mean", "pixel_std"):
        value = config.get(key)
        if value is not None and (
            not isinstance(value, (int, float)) or not math.isfinite(value) or (key == "pixel_std" and value <= 0)
        ):
            raise CxrflowError(
                f"checkpoint field 'config.{key}' must be a finite number{' > 0' if key == 'pixel_std' else ''}, got {value!r}",
                file,
            )


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[ChestClassifier, dict]:
    """Rebuild the model stored in a cxrflow checkpoint; returns it (eval mode) and the checkpoint dict."""
    file = Path(path)
    if not file.is_file():
        raise CxrflowError("no such checkpoint", file)
    try:
        ckpt = torch.load(safeio.regular_file(file, "checkpoint"), map_location=map_location, weights_only=True)
    except Exception as exc:  # see _load_weights_file
        raise CxrflowError(f"not a readable checkpoint: {exc}".splitlines()[0], file) from None
    if not isinstance(ckpt, dict) or not {"model", "config", "label_names"} <= set(ckpt):
        raise CxrflowError("not a cxrflow checkpoint (needs keys model, config, label_names)", file)
    _check_checkpoint(ckpt, file)
    name = ckpt["config"].get("model")
    if "fusion.proj.weight" in ckpt["model"]:
        raise CxrflowError(
            "this run fuses demographics the earlier way (an embedding beside the image features); "
            "train it again with this version of cxrflow",
            file,
        )
    model = create_model(name, len(ckpt["label_names"]), pretrained="none", fusion=ckpt["config"].get("fusion", "none"))
    load_weights(model, ckpt["model"], file)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    model.eval()
    return model, ckpt
