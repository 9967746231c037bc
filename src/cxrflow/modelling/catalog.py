"""The names the command line checks before torch is imported: models, models with activation
checkpointing, fusion methods.

Model names come from the model registry (:mod:`cxrflow.modelling.registry`, which imports no
torch); fusion methods are listed here because :mod:`cxrflow.data.demographics` imports torch, and a
test keeps the two equal.
"""

from __future__ import annotations

from cxrflow.errors import CxrflowError
from cxrflow.modelling.registry import checkpointing_models, model_entry, model_names

#: The built-in models (for help texts; :func:`check_model` reads the registry as it is now).
MODEL_NAMES: tuple[str, ...] = model_names()
CHECKPOINTING_MODELS: tuple[str, ...] = checkpointing_models()
#: Fusion methods ``--fusion`` accepts ("none": image only).
FUSIONS: tuple[str, ...] = ("none", "demographics")


def check_model(name: str) -> str:
    """``name`` if it is a registered model, else one CxrflowError listing the models."""
    return model_entry(name).name


def check_fusion(fusion: str) -> str:
    """``fusion`` if it is a fusion method, else one CxrflowError listing them."""
    if fusion not in FUSIONS:
        raise CxrflowError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
    return fusion
