"""How one training stage trains: which parameters, the optimiser, the learning-rate schedule, and
the seed of each epoch (the policy :func:`cxrflow.modelling.train.train` applies to every stage)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from cxrflow.errors import CxrflowError
from cxrflow.modelling.config import Stage, TrainConfig
from cxrflow.modelling.models import ChestClassifier


def make_optimizer(config: TrainConfig, params: list[nn.Parameter] | list[dict], lr: float) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor at ``step``: linear warm-up to 1, then half a cosine down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """Plateau (stepped per epoch on validation AUC), cosine (stepped per optimiser step) or None."""
    if config.scheduler == "cosine":
        warmup = min(config.warmup_steps, total_steps // 10)  # a short stage is not all warm-up
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total_steps))
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=config.plateau_factor, patience=config.plateau_patience
        )
    return None


def set_trainable(model: ChestClassifier, stage: Stage) -> None:
    """Freeze the backbone (weights and BatchNorm statistics) for a head-only stage; train all otherwise."""
    if stage.trainable not in ("head", "all"):
        raise CxrflowError(f"stage {stage.name}: trainable must be 'head' or 'all', got {stage.trainable!r}")
    model.freeze_backbone(stage.trainable == "head")


def epoch_seed(seed: int, stage_index: int, epoch: int, rank: int) -> int:
    """One seed per (stage, epoch, rank), so a resumed epoch draws exactly what the original would have."""
    return int(np.random.SeedSequence([seed, stage_index, epoch, rank]).generate_state(1)[0])
