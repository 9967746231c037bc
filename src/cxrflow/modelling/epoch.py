"""One training epoch: the optimisation steps of one stage's epoch, on every rank.

:func:`train_one_epoch` runs the steps (input normalisation, augmentation, mixed precision, the
loss, the optimiser and a per-step schedule) and stops every rank on a non-finite loss or weights
(:class:`NonFiniteLoss`). The stage loop that calls it, validation and checkpoints are
:mod:`cxrflow.modelling.train`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cxrflow.data.loader import augment
from cxrflow.data.uncertain import MaskedBCEWithLogits
from cxrflow.errors import CxrflowError
from cxrflow.modelling.distributed import Dist, all_reduce, any_rank, broadcast_buffers
from cxrflow.modelling.inference import autocast as _autocast
from cxrflow.modelling.inference import model_input
from cxrflow.modelling.inference import unwrap as _unwrap
from cxrflow.modelling.models import ChestClassifier
from cxrflow.progress import Progress

__all__ = ["NonFiniteLoss", "StepHook", "train_one_epoch"]

#: A hook called before each optimisation step: (model, stage name, epoch, step). For tests and tooling.
StepHook = Callable[[ChestClassifier, str, int, int], None]


class NonFiniteLoss(CxrflowError):
    """The training loss became NaN or infinite; the weights were not updated with it."""


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    criterion: Callable[..., torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    ctx: Dist,
    mean: float,
    std: float,
    steps: int,
    generator: torch.Generator | None,
    progress: Progress,
    stage: str,
    epoch: int,
    step_hook: StepHook | None = None,
    per_step_scheduler: Any = None,
) -> tuple[float, int, float]:
    """Train for ``steps`` batches; returns (mean loss over all ranks, images over all ranks, seconds).

    ``per_step_scheduler``: a learning-rate schedule stepped after every optimiser step (cosine).

    A non-finite loss on any rank stops every rank before the weights change; non-finite weights at
    the end of the epoch stop it before anything is saved (both raise :class:`NonFiniteLoss`).
    """
    device = ctx.device
    model.train()
    loss_sum, images = 0.0, 0
    start = time.perf_counter()
    batches = iter(loader)
    for step in range(1, steps + 1):
        batch = next(batches)
        x = model_input(batch["image"], mean, std, device)
        if generator is not None:
            x = augment(x, generator)
        y = batch["labels"].to(device, non_blocking=True)
        demographics = batch["demographics"].to(device, non_blocking=True)  # image-only models ignore them
        if step_hook is not None:
            step_hook(_unwrap(model), stage, epoch, step)
        with _autocast(device):
            logits = model(x, demographics=demographics)
        known = (batch["known"].to(device, non_blocking=True),) if isinstance(criterion, MaskedBCEWithLogits) else ()
        loss = criterion(logits.float(), y, *known)
        if any_rank(not bool(torch.isfinite(loss)), ctx):
            raise NonFiniteLoss(f"training loss is not finite (NaN/inf) at stage {stage}, epoch {epoch}, step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if per_step_scheduler is not None:
            per_step_scheduler.step()
        n = int(y.shape[0])
        loss_sum += float(loss.detach()) * n
        images += n
        progress.update(step, loss=loss_sum / images)
    progress.close()
    broadcast_buffers(_unwrap(model), ctx)  # each rank's BatchNorm statistics saw its own last batch
    if not all(bool(torch.isfinite(p).all()) for p in _unwrap(model).parameters() if p.requires_grad):
        raise NonFiniteLoss(f"the weights became NaN/inf during stage {stage}, epoch {epoch}")
    loss_sum, images_all = all_reduce([loss_sum, float(images)], ctx)
    return loss_sum / max(images_all, 1), int(images_all), time.perf_counter() - start
