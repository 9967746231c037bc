"""Two-stage training from the Parquet store: knowledge transfer (head only), then fine-tuning.

The stages are data (:meth:`cxrflow.modelling.config.TrainConfig.stages`) run by one loop. After every epoch
the whole validation split is scored, its mean AUC over the findings picks each stage's best
checkpoint, and ``last.pt`` records everything ``--resume`` needs to finish with the same result as
an uninterrupted run. Run folder::

    RUN/config.json      resolved config (store, size, model, label_names, stages, ...)
    RUN/metrics.jsonl    one JSON line per epoch
    RUN/best_kt.pt       best knowledge-transfer epoch      (not for simple_cnn)
    RUN/best_finetune.pt best fine-tuning epoch
    RUN/last.pt          the latest finished epoch
    RUN/done.json        written when the whole run has finished

Multi-GPU (or multi-process CPU) runs use DDP: ``torchrun --nproc_per_node N -m cxrflow.cli train
...`` (the command, :mod:`cxrflow.commands.train`, chooses the start); every rank reads its own
shard, validation predictions are gathered so every rank computes the same AUC, and rank 0 writes
the files (:mod:`cxrflow.modelling.distributed`). How each stage trains (parameters, optimiser,
schedule, seeds) is :mod:`cxrflow.modelling.stages`, one epoch's optimisation steps
:mod:`cxrflow.modelling.epoch`; this module runs the steps: plan the run from
the store, build the model, restore a resumed run, then per stage and epoch train, validate and save.
A run on several stores (``--store A --store B``) runs the same steps; its plan, mixed batches and
per-collection validation are :mod:`cxrflow.modelling.multitrain`. The run folder's files are
written by :mod:`cxrflow.modelling.runfolder`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrflow.atomic import read_json_object, write_json_atomic
from cxrflow.data.demographics import fusion_record
from cxrflow.data.loader import make_loader
from cxrflow.data.store import check_partition, pixel_stats, read_manifest, store_identity
from cxrflow.data.storeset import StoreSet
from cxrflow.data.uncertain import MaskedBCEWithLogits, policy_pos_weight
from cxrflow.errors import CxrflowError
from cxrflow.metrics import mean_auc, per_class_auc
from cxrflow.modelling.config import Stage, TrainConfig
from cxrflow.modelling.distributed import (
    Dist,
    barrier,
    leave_distributed,
    min_over_ranks,
    setup_distributed,
    wrap,
)
from cxrflow.modelling.epoch import NonFiniteLoss, StepHook, train_one_epoch
from cxrflow.modelling.fusion import init_from_store, param_groups
from cxrflow.modelling.inference import predict_split, resolve_device
from cxrflow.modelling.models import ChestClassifier, count_parameters, create_model, load_weights
from cxrflow.modelling.multitrain import fit_fusion, mixed_loader, plan_stores, validate_stores
from cxrflow.modelling.runfolder import load_checkpoint_file as _load
from cxrflow.modelling.runfolder import plain as _plain
from cxrflow.modelling.runfolder import prepare_run_folder as _prepare_run_folder
from cxrflow.modelling.runfolder import save_checkpoint
from cxrflow.modelling.runfolder import write_metrics as _write_metrics
from cxrflow.modelling.stages import epoch_seed, make_optimizer, make_scheduler, set_trainable, warmup_cosine
from cxrflow.outputs import claiming
from cxrflow.progress import Progress
from cxrflow.runs import recorded_paths
from cxrflow.tracking import TrackingRequest, tracked_training

__all__ = [
    "Dist",
    "StepHook",
    "run_process",
    "save_checkpoint",
    "setup_distributed",
    "train",
    "train_one_epoch",
    "warmup_cosine",
]


def _pos_weight(manifest: dict, k: int, store: Any) -> torch.Tensor:
    pw = manifest.get("pos_weight")
    if pw is None or len(pw) != k:
        raise CxrflowError(f"manifest pos_weight must have {k} values (one per finding)", store)
    return torch.tensor(pw, dtype=torch.float32)


# --- the run -------------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    ctx: Dist | None = None,
    step_hook: StepHook | None = None,
    log: Callable[[str], None] | None = None,
    epoch_hook: Callable[[list[dict]], None] | None = None,
) -> dict:
    """Run (or resume) a training run described by ``config``; returns the done.json summary.

    The run folder is locked for the whole run (one line naming the holder for a second run on
    it) and must be empty, absent, or (with ``--resume``/``--overwrite``) a cxrflow train run.

    ``epoch_hook`` (rank 0 only) gets the history after each epoch's files are written (tracking).
    """
    ctx = ctx or Dist(device=resolve_device(config.device))
    config.validate()
    with claiming(
        config.out,
        "train",
        overwrite=overwrite,
        resume=resume,
        create=False,
        inputs=config.all_stores(),
        legacy=("config.json",),
        lock=ctx.main,
        how="pass --resume to continue it or --overwrite to start again",
    ):
        say = log or (lambda msg: print(msg, flush=True))
        run = _Run(
            config, ctx, Path(config.out), say, say if ctx.main else (lambda msg: None), quiet, step_hook, epoch_hook
        )
        return _train(run, resume=resume, overwrite=overwrite)


@dataclass
class _Run:
    """One training process's run: settings, where it stands among the ranks, what it has done so far."""

    config: TrainConfig
    ctx: Dist
    out: Path
    say: Callable[[str], None]  # every rank (DDP lines carry their rank)
    info: Callable[[str], None]  # rank 0 only
    quiet: bool
    step_hook: StepHook | None
    epoch_hook: Callable[[list[dict]], None] | None
    plan: _Plan | None = None
    model: Any = None
    criterion: Any = None
    history: list[dict] = field(default_factory=list)
    best: dict[str, dict] = field(default_factory=dict)
    bad_epochs: int = 0


@dataclass
class _Plan:
    """What the store decides about a run: findings, normalisation, loss weights, stages, saved config."""

    label_names: list[str]
    mean: float
    std: float
    masked: bool  # some labels are not known: the loss counts known ones only
    pos_weight: torch.Tensor
    train_rows: int
    stages: list[Stage]
    saved: dict
    stores: StoreSet | None = None  # a run on several stores (cxrflow.modelling.multitrain)


def _train(run: _Run, *, resume: bool, overwrite: bool) -> dict:
    """The steps of a run: plan it, build the model, restore a resumed run, train each stage, finish."""
    config, out = run.config, run.out
    run.plan = _plan(run)
    if resume and (out / "done.json").exists():
        run.info(f"{out} already finished (done.json); nothing to resume")
        return read_json_object(out / "done.json", "run summary (done.json)")
    resuming = resume and (out / "last.pt").exists()
    torch.manual_seed(config.seed)
    # built before the run folder is touched, so a weights problem leaves nothing behind; a resumed
    # run takes every weight from last.pt, so its starting weights need not exist any more
    run.model = _build_model(run, pretrained="none" if resuming else config.pretrained, resuming=resuming)
    _prepare_run_folder(out, resume=resume, overwrite=overwrite, ctx=run.ctx)
    state = _load(out / "last.pt") if resuming else None
    if run.ctx.main:
        write_json_atomic(out / "config.json", run.plan.saved)
    start_stage, start_epoch = _restore(run, state)
    stages = run.plan.stages
    global_epoch = sum(s.epochs for s in stages[:start_stage])
    run_start = time.perf_counter()
    for stage_index in range(start_stage, len(stages)):
        continuing = stage_index == start_stage and state is not None and not state["stage_finished"]
        _run_stage(
            run,
            stage_index,
            global_epoch,
            start_epoch if stage_index == start_stage else 1,
            state if continuing else None,
        )
        global_epoch += stages[stage_index].epochs
        run.bad_epochs = 0
    return _finish(run, time.perf_counter() - run_start)


def _plan(run: _Run) -> _Plan:
    """Read the store: its findings, train and val splits, normalisation and loss weights; the stages
    this amount of data gets; the config the run saves (it travels with the run, so predict works
    without the store, and the splits' identity lets evaluate refuse another dataset's store)."""
    config, ctx = run.config, run.ctx
    config.validate()
    if config.multi_store:
        return _multi_plan(run)
    manifest = read_manifest(config.store)
    label_names = list(manifest["label_names"])
    for split in ("train", "val"):
        check_partition(manifest, config.store, config.size, split)
        if int(manifest["rows"][str(int(config.size))][split]) == 0:
            raise CxrflowError(f"split {split!r} at size {config.size} is empty; nothing to {split} on", config.store)
    mean, std = pixel_stats(manifest, config.size)
    masked = "uncertain_policies" in manifest
    pos_weight = (
        policy_pos_weight(manifest, config.uncertain)
        if masked
        else _pos_weight(manifest, len(label_names), config.store)
    ).to(ctx.device)
    untrained = [n for n, w in zip(label_names, pos_weight.tolist()) if w == 0]
    if untrained:  # negatives / positives = 0: the loss gives these outputs no gradient at all
        run.info(
            f"note: no negative train label for {', '.join(untrained)}: pos_weight 0, so "
            f"{'this output does' if len(untrained) == 1 else 'these outputs do'} not learn; "
            "their test AUC is the untrained model's"
        )
    train_rows = int(manifest["rows"][str(int(config.size))]["train"])
    stages = config.stage_plan(train_rows, ctx.world_size)
    saved = {
        **config.to_dict(),
        **recorded_paths(store=config.store, out=config.out),  # absolute: the run works from any folder
        **fusion_record(config.fusion),
        "label_names": label_names,
        "stages": [vars(s) for s in stages],
        "world_size": ctx.world_size,
        "pixel_mean": mean,
        "pixel_std": std,
        "store_identity": store_identity(config.store, manifest, config.size),
    }
    return _Plan(label_names, mean, std, masked, pos_weight, train_rows, stages, saved)


def _multi_plan(run: _Run) -> _Plan:
    """:func:`_plan` of a run on several stores (:func:`cxrflow.modelling.multitrain.plan_stores`)."""
    config, ctx = run.config, run.ctx
    found = plan_stores(config)
    stages = config.stage_plan(found["train_rows"], ctx.world_size)
    saved = {
        **config.to_dict(),
        **fusion_record(config.fusion),
        "label_names": found["label_names"],
        "stages": [vars(s) for s in stages],
        "world_size": ctx.world_size,
        "pixel_mean": found["mean"],
        "pixel_std": found["std"],
        **found["saved"],
    }
    pos_weight = torch.tensor(found["pos_weight"], dtype=torch.float32).to(ctx.device)
    return _Plan(found["label_names"], found["mean"], found["std"], True, pos_weight, found["train_rows"], stages,
                 saved, found["stores"])  # fmt: skip


def _build_model(run: _Run, pretrained: str, resuming: bool) -> ChestClassifier:
    """The model on the run's device with its starting weights (a fused model's demographic term
    fitted on the training split, unless resumed or loaded), and the loss."""
    config, plan, ctx = run.config, run.plan, run.ctx
    model = create_model(
        config.model,
        len(plan.label_names),
        pretrained=pretrained,
        fusion=config.fusion,
        grad_checkpointing=config.grad_checkpointing,
    )
    for note in getattr(model, "load_notes", []):
        run.info(f"weights {config.pretrained}: {note}")
    if model.fusion is not None and not resuming and "loaded fusion layers" not in getattr(model, "load_notes", []):
        run.info(
            fit_fusion(model, plan.stores, config, plan.pos_weight.tolist())
            if plan.stores is not None
            else init_from_store(
                model,
                config.store,
                config.size,
                uncertain=config.uncertain,
                pos_weight=plan.pos_weight.tolist(),
                seed=config.seed,
            )
        )
    model.to(ctx.device)
    if ctx.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    run.criterion = (
        MaskedBCEWithLogits(plan.pos_weight) if plan.masked else nn.BCEWithLogitsLoss(pos_weight=plan.pos_weight)
    )
    return model


def _restore(run: _Run, state: dict | None) -> tuple[int, int]:
    """Take a resumed run's history, best epochs and weights from last.pt; (stage index, epoch) to start at."""
    if state is None:
        return 0, 1
    run.history, run.best = list(state["history"]), dict(state["best"])
    start_stage, start_epoch = int(state["stage_index"]), int(state["epoch"]) + 1
    run.bad_epochs = int(state["bad_epochs"])
    if state["stage_finished"]:
        start_stage, start_epoch, run.bad_epochs = start_stage + 1, 1, 0
    load_weights(run.model, state["model"], run.out / "last.pt")
    run.info(f"resuming {run.out} after stage {state['stage']} epoch {state['epoch']} with the run's saved config")
    if run.ctx.main:
        _write_metrics(run.out, run.history)
    return start_stage, start_epoch


@dataclass
class _StageRun:
    """One stage being trained: the stage, its optimiser and schedule, and the model as trained (DDP or not)."""

    index: int
    stage: Stage
    optimizer: torch.optim.Optimizer
    scheduler: Any
    per_step: Any  # the scheduler when it steps per optimiser step (cosine)
    net: nn.Module
    global_epoch: int


def _run_stage(run: _Run, stage_index: int, global_epoch: int, epoch_start: int, state: dict | None) -> None:
    """Train one stage from ``epoch_start`` (``state``: last.pt of a run stopped inside this stage)."""
    stage = run.plan.stages[stage_index]
    current = _start_stage(run, stage_index, global_epoch, state)
    for epoch in range(epoch_start, stage.epochs + 1):
        if _run_epoch(run, current, epoch, first=epoch == epoch_start):
            run.info(f"stage {stage.name}: no improvement for {_count(run.bad_epochs, 'epoch')}; stopping early")
            break


def _start_stage(run: _Run, stage_index: int, global_epoch: int, state: dict | None) -> _StageRun:
    """Starting weights, trainable parameters, optimiser and schedule of a stage (restored from ``state``)."""
    config, plan, model = run.config, run.plan, run.model
    stage = plan.stages[stage_index]
    if stage.name == "finetune" and state is None and any(s.name == "kt" for s in plan.stages[:stage_index]):
        kt = _load(run.out / "best_kt.pt")
        load_weights(model, kt["model"], run.out / "best_kt.pt")
        run.info(f"fine-tuning starts from best_kt.pt (epoch {kt['epoch']})")
    elif stage_index == 0 and state is None:
        run.info(f"stage {stage.name} starts from weights: {config.pretrained}")
    set_trainable(model, stage)
    trainable, total = count_parameters(model)
    steps_per_epoch = max(1, plan.train_rows // (config.batch_size * run.ctx.world_size))
    run.info(
        f"stage {stage.name}: trainable {trainable:,} of {total:,} parameters, lr {stage.lr:g}, "
        f"{_count(stage.epochs, 'epoch')} of about {_count(steps_per_epoch, 'step')}, scheduler {config.scheduler}"
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, param_groups(model, params, stage.lr, config.weight_decay), stage.lr)
    scheduler = make_scheduler(config, optimizer, stage.epochs * steps_per_epoch)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
    per_step = scheduler if config.scheduler == "cosine" else None
    return _StageRun(stage_index, stage, optimizer, scheduler, per_step, wrap(model, run.ctx), global_epoch)


def _run_epoch(run: _Run, current: _StageRun, epoch: int, *, first: bool) -> bool:
    """Train one epoch, score validation, save; whether the stage stops early."""
    t0 = time.perf_counter()
    lr = float(current.optimizer.param_groups[0]["lr"])  # the rate the epoch starts at (cosine moves it per step)
    train_loss, images, train_seconds = _train_epoch(run, current, epoch)
    val = _validate(run, first=first)
    row = {
        "stage": current.stage.name,
        "epoch": epoch,
        "train_loss": _plain(train_loss),
        "val_loss": val["val_loss"],
        "val_auc_mean": val["val_auc_mean"],
        "val_auc": val["val_auc"],
        "lr": lr,
        "seconds": time.perf_counter() - t0,
        "images_per_second": images / max(train_seconds, 1e-9),
        "train_images": images,
        "val_images": val["val_images"],
        **({"val_auc_by_store": val["val_auc_by_store"]} if "val_auc_by_store" in val else {}),
    }
    run.history.append(row)
    auc = row["val_auc_mean"] if row["val_auc_mean"] is not None else math.nan
    if run.config.scheduler == "plateau" and current.scheduler is not None and math.isfinite(auc):
        current.scheduler.step(auc)
    prev = run.best.get(current.stage.name)
    improved = prev is None or (math.isfinite(auc) and (prev["val_auc_mean"] is None or auc > prev["val_auc_mean"]))
    if improved:
        run.best[current.stage.name] = {"epoch": epoch, "val_auc_mean": _plain(auc)}
        run.bad_epochs = 0
    else:
        run.bad_epochs += 1
    patience = run.config.early_stopping_patience
    stop_early = patience > 0 and run.bad_epochs >= patience
    _save_epoch(run, current, epoch, row, improved=improved, finished=stop_early or epoch == current.stage.epochs)
    val_loss = "n/a" if row["val_loss"] is None else f"{row['val_loss']:.3f}"
    run.info(
        f"{current.stage.name} epoch {epoch}/{current.stage.epochs}: train loss {train_loss:.3f}, "
        f"val loss {val_loss}, val AUC {_auc_text(row['val_auc_mean'])}{_by_store(row)}{' (best)' if improved else ''}, "
        f"lr {lr:.3g}, {row['images_per_second']:.0f} img/s"
    )
    return stop_early


def _train_epoch(run: _Run, current: _StageRun, epoch: int) -> tuple[float, int, float]:
    """The optimiser steps of one epoch over this rank's shard; (mean loss, images, seconds)."""
    config, ctx, stage = run.config, run.ctx, current.stage
    seed = epoch_seed(config.seed, current.index, epoch, ctx.rank)
    torch.manual_seed(seed)
    generator = torch.Generator(device=ctx.device).manual_seed(seed) if config.augment else None
    train_rows = run.plan.train_rows
    make = make_loader if run.plan.stores is None else partial(_mixed, run)
    loader = make(
        config.store,
        config.size,
        "train",
        batch_size=config.batch_size,
        shuffle=True,
        seed=config.seed,
        epoch=current.global_epoch + epoch - 1,
        num_workers=config.num_workers,
        rank=ctx.rank,
        world_size=ctx.world_size,
        drop_last=train_rows >= config.batch_size * ctx.world_size,
        uncertain=config.uncertain,
    )
    steps = min_over_ranks(len(loader), ctx)
    if steps == 0:
        raise CxrflowError(
            f"the train split ({train_rows} rows) is too small for batch size {config.batch_size} "
            f"on {ctx.world_size} processes",
            config.store,
        )
    progress = Progress(steps, f"{stage.name} {epoch}/{stage.epochs}", enabled=ctx.main and not run.quiet, unit="batch")
    try:
        return train_one_epoch(
            current.net,
            loader,
            run.criterion,
            current.optimizer,
            ctx=ctx,
            mean=run.plan.mean,
            std=run.plan.std,
            steps=steps,
            generator=generator,
            progress=progress,
            stage=stage.name,
            epoch=epoch,
            step_hook=run.step_hook,
            per_step_scheduler=current.per_step,
        )
    except NonFiniteLoss as exc:
        progress.close()
        history, last = run.history, run.out / "last.pt"
        kept = (
            f"the last good checkpoint is {last} ({history[-1]['stage']} epoch {history[-1]['epoch']})"
            if history
            else "no epoch had finished, so no checkpoint was written"
        )
        raise CxrflowError(
            f"{exc.message}; stopped without saving it, {kept}. Lower the learning "
            "rate (--lr) and start again with --overwrite, or continue from a checkpoint with --pretrained PATH",
            run.out,
        ) from None


def _validate(run: _Run, *, first: bool) -> dict:
    """Score the whole validation split: loss, mean AUC, AUC per finding, images."""
    config, ctx, names = run.config, run.ctx, run.plan.label_names
    if run.plan.stores is not None:
        return validate_stores(run.model, run.plan.stores, config, ctx, mean=run.plan.mean, std=run.plan.std,
                               pos_weight=run.plan.pos_weight, note=run.info if first else None)  # fmt: skip
    val = predict_split(
        run.model,
        config.store,
        config.size,
        "val",
        batch_size=config.eval_batch_size,
        device=ctx.device,
        num_workers=config.num_workers,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    aucs = per_class_auc(val["labels"], val["probs"], val["known"] if run.plan.masked else None)
    auc = mean_auc(aucs)
    undefined = [n for n, a in zip(names, aucs) if math.isnan(a)]
    if undefined and first:
        run.info(f"val AUC undefined (one class only) for {', '.join(undefined)}; excluded from the mean")
    return {
        "val_loss": _plain(val["loss"]) if val["loss"] is not None else None,
        "val_auc_mean": _plain(auc),
        "val_auc": {n: _plain(a) for n, a in zip(names, aucs)},
        "val_images": len(val["image_id"]),
    }


def _mixed(run: _Run, store: Any, size: int, split: str, *, epoch: int, drop_last: bool, **_: Any) -> Any:
    """The train loader of a run on several stores, called like :func:`make_loader`."""
    return mixed_loader(run.config, run.plan.stores, epoch=epoch, ctx=run.ctx, drop_last=drop_last)


def _save_epoch(run: _Run, current: _StageRun, epoch: int, row: dict, *, improved: bool, finished: bool) -> None:
    """last.pt (and best_<stage>.pt when the epoch improved) with everything --resume needs; metrics.jsonl."""
    payload = {
        "model": run.model.state_dict(),
        "optimizer": current.optimizer.state_dict(),
        "scheduler": current.scheduler.state_dict() if current.scheduler is not None else None,
        "stage": current.stage.name,
        "epoch": epoch,
        "config": run.plan.saved,
        "label_names": run.plan.label_names,
        "metrics": row,
        "stage_index": current.index,
        "stage_finished": finished,
        "bad_epochs": run.bad_epochs,
        "best": run.best,
        "history": run.history,
    }
    if run.ctx.main:
        if improved:
            save_checkpoint(run.out / f"best_{current.stage.name}.pt", payload)
        save_checkpoint(run.out / "last.pt", payload)
        _write_metrics(run.out, run.history)
        if run.epoch_hook is not None:
            run.epoch_hook(run.history)
    barrier(run.ctx)


def _finish(run: _Run, seconds: float) -> dict:
    """done.json and one line per stage's best epoch."""
    summary = {
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "best": run.best,
        "epochs": len(run.history),
        "wall_seconds_last_session": seconds,
        "checkpoints": {name: f"best_{name}.pt" for name in run.best},
    }
    if run.ctx.main:
        write_json_atomic(run.out / "done.json", summary)
    for name, b in run.best.items():
        if run.ctx.active:  # every rank's own figure, in full: the ranks must agree on it
            run.say(f"[rank {run.ctx.rank}] best {name}: epoch {b['epoch']}, val AUC {b['val_auc_mean']}")
        else:
            run.info(f"best {name}: epoch {b['epoch']}, val AUC {_auc_text(b['val_auc_mean'])}")
    return summary


def _auc_text(auc: float | None) -> str:
    return "n/a" if auc is None or math.isnan(auc) else f"{auc:.3f}"


def _by_store(row: dict) -> str:
    """`` (nih 0.812, chexpert 0.774)``: each collection's val AUC of a run on several stores."""
    stores = row.get("val_auc_by_store")
    if not stores:
        return ""
    return " (" + ", ".join(f"{name} {_auc_text(s['mean'])}" for name, s in stores.items()) + ")"


def _count(n: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def run_process(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    tracking: TrackingRequest | None = None,
) -> dict:
    """One training process, however it was started (alone, torchrun, Spark's TorchDistributor)."""
    ctx = setup_distributed(config.device)
    try:
        with tracked_training(tracking, config.out, enabled=ctx.main) as epoch_hook:
            return train(config, resume=resume, overwrite=overwrite, quiet=quiet, ctx=ctx, epoch_hook=epoch_hook)
    finally:
        leave_distributed(ctx)
