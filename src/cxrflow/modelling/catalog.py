"""The names the command line checks before torch is imported: models, models with activation
checkpointing, fusion methods.

The implementations live in :mod:`cxrflow.modelling.models` (the model registry) and
:mod:`cxrflow.data.demographics` (the fusion); those import torch, which takes seconds, so the names
a user types are also listed here, and a test keeps the two equal.
"""

from __future__ import annotations

from cxrflow.errors import CxrflowError

MODEL_NAMES: tuple[str, ...] = ("simple_cnn", "resnet50", "densenet121")
CHECKPOINTING_MODELS: tuple[str, ...] = ("resnet50", "densenet121")
#: Fusion methods ``--fusion`` accepts ("none": image only).
FUSIONS: tuple[str, ...] = ("none", "demographics")


def check_model(name: str) -> str:
    """``name`` if it is a registered model, else one CxrflowError listing the models."""
    if name not in MODEL_NAMES:
        raise CxrflowError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return name


def check_fusion(fusion: str) -> str:
    """``fusion`` if it is a fusion method, else one CxrflowError listing them."""
    if fusion not in FUSIONS:
        raise CxrflowError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
    return fusion
