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
...``; every rank reads its own shard, validation predictions are gathered so every rank computes
the same AUC, and rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cxrflow.modelling import sparktrain
from cxrflow.atomic import atomic_path, read_json_object, write_json_atomic, write_text_atomic
from cxrflow.modelling.config import (
    DEVICES,
    PRESETS,
    STAGE_CHOICES,
    Stage,
    UNCERTAIN_POLICIES,
    TrainConfig,
    config_from_dict,
    resolve_config,
)
from cxrflow.data.demographics import FUSIONS, fusion_record
from cxrflow.errors import CxrflowError
from cxrflow import options
from cxrflow.identity import store_identity
from cxrflow.modelling.inference import autocast as _autocast
from cxrflow.modelling.inference import model_input, predict_split, resolve_device
from cxrflow.modelling.inference import unwrap as _unwrap
from cxrflow.data.loader import augment, make_loader
from cxrflow.results.metrics import mean_auc, per_class_auc
from cxrflow.modelling.models import MODEL_NAMES, ChestClassifier, count_parameters, create_model, load_weights
from cxrflow import safeio
from cxrflow.outputs import claiming, read_marker, write_marker
from cxrflow.data.store import check_partition, pixel_stats, read_manifest
from cxrflow.data.uncertain import MaskedBCEWithLogits, policy_pos_weight
from cxrflow.tracking import TrackingRequest, request_from_args, tracked_training
from cxrflow.tracking import add_arguments as add_tracking_arguments

#: Files a run writes; ``--overwrite`` removes exactly these.
RUN_FILES = ("config.json", "metrics.jsonl", "best_kt.pt", "best_finetune.pt", "last.pt", "done.json", "mlflow.json")

#: A hook called before each optimisation step: (model, stage name, epoch, step). For tests and tooling.
StepHook = Callable[[ChestClassifier, str, int, int], None]


# --- processes and devices -----------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_choice: str) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), if any."""
    device = resolve_device(device_choice)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world_size, device=device)


def _barrier(ctx: Dist) -> None:
    if ctx.active:
        dist.barrier()


def _all_reduce(values: list[float], ctx: Dist, op=None) -> list[float]:
    if not ctx.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


# --- prediction and validation -------------------------------------------------------------------


def _pos_weight(manifest: dict, k: int, store: Any) -> torch.Tensor:
    pw = manifest.get("pos_weight")
    if pw is None or len(pw) != k:
        raise CxrflowError(f"manifest pos_weight must have {k} values (one per finding)", store)
    return torch.tensor(pw, dtype=torch.float32)


class NonFiniteLoss(CxrflowError):
    """The training loss became NaN or infinite; the weights were not updated with it."""


# --- one epoch -----------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr: batches done, running loss, images/s."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label = total, label
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last_draw = 0.0

    def update(self, step: int, loss: float, images: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last_draw < 0.2 and step < self.total:
            return
        self.last_draw = now
        width = 24
        filled = int(width * step / max(self.total, 1))
        rate = images / max(now - self.start, 1e-9)
        sys.stderr.write(
            f"\r{self.label} [{'=' * filled}{' ' * (width - filled)}] {step}/{self.total} "
            f"loss {loss:.4f} {rate:.1f} img/s"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


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
        bad = not bool(torch.isfinite(loss))
        if ctx.active:
            bad = _all_reduce([float(bad)], ctx, dist.ReduceOp.MAX)[0] > 0
        if bad:
            raise NonFiniteLoss(f"training loss is not finite (NaN/inf) at stage {stage}, epoch {epoch}, step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if per_step_scheduler is not None:
            per_step_scheduler.step()
        n = int(y.shape[0])
        loss_sum += float(loss.detach()) * n
        images += n
        progress.update(step, loss_sum / images, images * ctx.world_size)
    progress.close()
    if ctx.active:
        # each rank's BatchNorm statistics saw its own last batch; use rank 0's (the saved model's) everywhere
        for buffer in _unwrap(model).buffers():
            dist.broadcast(buffer, src=0)
    if not all(bool(torch.isfinite(p).all()) for p in _unwrap(model).parameters() if p.requires_grad):
        raise NonFiniteLoss(f"the weights became NaN/inf during stage {stage}, epoch {epoch}")
    loss_sum, images_all = _all_reduce([loss_sum, float(images)], ctx)
    return loss_sum / max(images_all, 1), int(images_all), time.perf_counter() - start


# --- checkpoints and the run folder ----------------------------------------------------------------


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save to a temporary file in the same folder, then rename into place.

    Serialized in memory first: torch.save writing to a full disk raises a RuntimeError that does
    not say why ("unexpected pos"), a plain write raises the OSError (no space left) it is."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buffer.getbuffer())


def _load(path: Path) -> dict:
    try:
        return torch.load(safeio.regular_file(path, "checkpoint"), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean a damaged file
        raise CxrflowError(f"cannot read checkpoint: {str(exc).splitlines()[0]}", path) from None


def _plain(value: float) -> float | None:
    """A JSON- and weights_only-safe float: NaN/inf become None."""
    return float(value) if value is not None and math.isfinite(value) else None


def _prepare_run_folder(out: Path, *, resume: bool, overwrite: bool, ctx: Dist) -> None:
    """Refuse to clobber an existing run; with --overwrite remove only the files a run writes."""
    existing = [p for p in out.iterdir()] if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise CxrflowError("the run folder path exists and is not a folder", out)
    if existing and not (resume or overwrite):
        raise CxrflowError("run folder already exists; pass --resume to continue it or --overwrite to start again", out)
    _barrier(ctx)  # every rank has checked before rank 0 changes anything
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        if read_marker(out, "train") is None:
            write_marker(out, "train")
        for stale in out.glob(".*.tmp"):
            stale.unlink()
        if overwrite and not resume:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
            # evaluations of the old checkpoints describe a model that no longer exists; only folders
            # 'cxrflow evaluate' wrote (its marker, not a link) go: any other eval-* is left alone
            for evaluation in out.glob("eval-*"):
                if evaluation.is_dir() and not evaluation.is_symlink() and read_marker(evaluation, "evaluate") is not None:
                    shutil.rmtree(evaluation)
    _barrier(ctx)


def _write_metrics(out: Path, history: list[dict]) -> None:
    """Rewrite metrics.jsonl from the history (atomic; the history lives in last.pt too)."""
    write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))


# --- the loop --------------------------------------------------------------------------------------


def _make_optimizer(config: TrainConfig, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor at ``step``: linear warm-up to 1, then half a cosine down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """Plateau (stepped per epoch on validation AUC), cosine (stepped per optimiser step) or None."""
    if config.scheduler == "cosine":
        warmup = min(config.warmup_steps, total_steps // 10)  # a short stage is not all warm-up
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total_steps))
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=config.plateau_factor, patience=config.plateau_patience
        )
    return None


def _set_trainable(model: ChestClassifier, stage: Stage) -> None:
    if stage.trainable not in ("head", "all"):
        raise CxrflowError(f"stage {stage.name}: trainable must be 'head' or 'all', got {stage.trainable!r}")
    model.freeze_backbone(stage.trainable == "head")


def _epoch_seed(seed: int, stage_index: int, epoch: int, rank: int) -> int:
    """One seed per (stage, epoch, rank), so a resumed epoch draws exactly what the original would have."""
    return int(np.random.SeedSequence([seed, stage_index, epoch, rank]).generate_state(1)[0])


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
    with claiming(config.out, "train", overwrite=overwrite, resume=resume, create=False, inputs=[config.store],
                  legacy=("config.json",), lock=ctx.main, how="pass --resume to continue it or --overwrite to start again"):
        return _train(config, resume=resume, overwrite=overwrite, quiet=quiet, ctx=ctx, step_hook=step_hook, log=log,
                      epoch_hook=epoch_hook)


def _train(
    config: TrainConfig,
    *,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    ctx: Dist,
    step_hook: StepHook | None,
    log: Callable[[str], None] | None,
    epoch_hook: Callable[[list[dict]], None] | None,
) -> dict:
    say = log or (lambda msg: print(msg, flush=True))
    info = say if ctx.main else (lambda msg: None)
    out = Path(config.out)
    config.validate()
    manifest = read_manifest(config.store)
    label_names = list(manifest["label_names"])
    for split in ("train", "val"):
        check_partition(manifest, config.store, config.size, split)
        if int(manifest["rows"][str(int(config.size))][split]) == 0:
            raise CxrflowError(f"split {split!r} at size {config.size} is empty; nothing to {split} on", config.store)
    mean, std = pixel_stats(manifest, config.size)
    masked = "uncertain_policies" in manifest  # some labels are not known: the loss counts known ones only
    pos_weight = (policy_pos_weight(manifest, config.uncertain) if masked
                  else _pos_weight(manifest, len(label_names), config.store)).to(ctx.device)
    untrained = [n for n, w in zip(label_names, pos_weight.tolist()) if w == 0]
    if untrained:  # negatives / positives = 0: the loss gives these outputs no gradient at all
        info(f"note: no negative train label for {', '.join(untrained)}: pos_weight 0, so "
             f"{'this output does' if len(untrained) == 1 else 'these outputs do'} not learn; "
             "their test AUC is the untrained model's")
    train_rows = int(manifest["rows"][str(int(config.size))]["train"])
    stages = config.stage_plan(train_rows, ctx.world_size)
    # the normalisation travels with the run, so predict works without the store; the splits'
    # identity lets evaluate refuse another dataset's store
    saved = {**config.to_dict(), **fusion_record(config.fusion), "label_names": label_names, "stages": [vars(s) for s in stages],
             "world_size": ctx.world_size, "pixel_mean": mean, "pixel_std": std,
             "store_identity": store_identity(config.store, manifest, config.size)}

    if resume and (out / "done.json").exists():
        info(f"{out} already finished (done.json); nothing to resume")
        return read_json_object(out / "done.json", "run summary (done.json)")
    resuming = resume and (out / "last.pt").exists()
    torch.manual_seed(config.seed)
    # built before the run folder is touched, so a weights problem leaves nothing behind; a resumed
    # run takes every weight from last.pt, so its starting weights need not exist any more
    model = create_model(
        config.model, len(label_names), pretrained="none" if resuming else config.pretrained, fusion=config.fusion,
        grad_checkpointing=config.grad_checkpointing,
    )
    for note in getattr(model, "load_notes", []):
        info(f"weights {config.pretrained}: {note}")
    _prepare_run_folder(out, resume=resume, overwrite=overwrite, ctx=ctx)
    state = _load(out / "last.pt") if resuming else None
    if ctx.main:
        write_json_atomic(out / "config.json", saved)
    model.to(ctx.device)
    if ctx.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    criterion = MaskedBCEWithLogits(pos_weight) if masked else nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    history: list[dict] = []
    best: dict[str, dict] = {}
    start_stage, start_epoch, bad_epochs = 0, 1, 0
    if state is not None:
        history, best = list(state["history"]), dict(state["best"])
        start_stage, start_epoch, bad_epochs = int(state["stage_index"]), int(state["epoch"]) + 1, int(state["bad_epochs"])
        if state["stage_finished"]:
            start_stage, start_epoch, bad_epochs = start_stage + 1, 1, 0
        load_weights(model, state["model"], out / "last.pt")
        info(f"resuming {out} after stage {state['stage']} epoch {state['epoch']} with the run's saved config")
        if ctx.main:
            _write_metrics(out, history)

    global_epoch = sum(s.epochs for s in stages[:start_stage])
    run_start = time.perf_counter()
    for stage_index in range(start_stage, len(stages)):
        stage = stages[stage_index]
        first = stage_index == start_stage and state is not None and not state["stage_finished"]
        if stage.name == "finetune" and not first and any(s.name == "kt" for s in stages[:stage_index]):
            kt = _load(out / "best_kt.pt")
            load_weights(model, kt["model"], out / "best_kt.pt")
            info(f"fine-tuning starts from best_kt.pt (epoch {kt['epoch']})")
        elif stage_index == 0 and not first:
            info(f"stage {stage.name} starts from weights: {config.pretrained}")
        _set_trainable(model, stage)
        trainable, total = count_parameters(model)
        steps_per_epoch = max(1, train_rows // (config.batch_size * ctx.world_size))
        info(
            f"stage {stage.name}: trainable {trainable:,} of {total:,} parameters, lr {stage.lr:g}, {stage.epochs} epochs "
            f"of about {steps_per_epoch} steps, scheduler {config.scheduler}"
        )
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = _make_optimizer(config, params, stage.lr)
        scheduler = _make_scheduler(config, optimizer, stage.epochs * steps_per_epoch)
        per_step = scheduler if config.scheduler == "cosine" else None
        if first:
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state["scheduler"] is not None:
                scheduler.load_state_dict(state["scheduler"])
        net: nn.Module = model
        if ctx.active:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
            )
        epoch_start = start_epoch if stage_index == start_stage else 1
        for epoch in range(epoch_start, stage.epochs + 1):
            seed = _epoch_seed(config.seed, stage_index, epoch, ctx.rank)
            torch.manual_seed(seed)
            generator = None
            if config.augment:
                generator = torch.Generator(device=ctx.device).manual_seed(seed)
            loader = make_loader(
                config.store, config.size, "train", batch_size=config.batch_size, shuffle=True, seed=config.seed,
                epoch=global_epoch + epoch - 1, num_workers=config.num_workers, rank=ctx.rank,
                world_size=ctx.world_size, drop_last=train_rows >= config.batch_size * ctx.world_size,
                uncertain=config.uncertain,
            )
            steps = len(loader)
            if ctx.active:
                steps = int(_all_reduce([float(steps)], ctx, dist.ReduceOp.MIN)[0])
            if steps == 0:
                raise CxrflowError(
                    f"the train split ({train_rows} rows) is too small for batch size {config.batch_size} "
                    f"on {ctx.world_size} processes", config.store
                )
            t0 = time.perf_counter()
            lr = float(optimizer.param_groups[0]["lr"])  # the rate the epoch starts at (cosine moves it per step)
            progress = Progress(steps, f"{stage.name} {epoch}/{stage.epochs}", enabled=ctx.main and not quiet)
            try:
                train_loss, images, train_seconds = train_one_epoch(
                    net, loader, criterion, optimizer, ctx=ctx, mean=mean, std=std, steps=steps, generator=generator,
                    progress=progress, stage=stage.name, epoch=epoch, step_hook=step_hook, per_step_scheduler=per_step,
                )
            except NonFiniteLoss as exc:
                progress.close()
                kept = (
                    f"the last good checkpoint is {out / 'last.pt'} ({history[-1]['stage']} epoch {history[-1]['epoch']})"
                    if history else "no epoch had finished, so no checkpoint was written"
                )
                raise CxrflowError(
                    f"{exc.message}; stopped without saving it, {kept}. Lower the learning "
                    "rate (--lr) and start again with --overwrite, or continue from a checkpoint with --pretrained PATH",
                    out,
                ) from None
            val = predict_split(
                model, config.store, config.size, "val", batch_size=config.eval_batch_size, device=ctx.device,
                num_workers=config.num_workers, rank=ctx.rank, world_size=ctx.world_size,
            )
            aucs = per_class_auc(val["labels"], val["probs"], val["known"] if masked else None)
            auc = mean_auc(aucs)
            undefined = [n for n, a in zip(label_names, aucs) if math.isnan(a)]
            if undefined and epoch == epoch_start:
                info(f"val AUC undefined (one class only) for {', '.join(undefined)}; excluded from the mean")
            row = {
                "stage": stage.name,
                "epoch": epoch,
                "train_loss": _plain(train_loss),
                "val_loss": _plain(val["loss"]) if val["loss"] is not None else None,
                "val_auc_mean": _plain(auc),
                "val_auc": {n: _plain(a) for n, a in zip(label_names, aucs)},
                "lr": lr,
                "seconds": time.perf_counter() - t0,
                "images_per_second": images / max(train_seconds, 1e-9),
                "train_images": images,
                "val_images": len(val["image_id"]),
            }
            history.append(row)
            if config.scheduler == "plateau" and scheduler is not None and math.isfinite(auc):
                scheduler.step(auc)
            prev = best.get(stage.name)
            improved = prev is None or (
                math.isfinite(auc) and (prev["val_auc_mean"] is None or auc > prev["val_auc_mean"])
            )
            if improved:
                best[stage.name] = {"epoch": epoch, "val_auc_mean": _plain(auc)}
                bad_epochs = 0
            else:
                bad_epochs += 1
            stop_early = config.early_stopping_patience > 0 and bad_epochs >= config.early_stopping_patience
            finished = stop_early or epoch == stage.epochs
            payload = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "stage": stage.name,
                "epoch": epoch,
                "config": saved,
                "label_names": label_names,
                "metrics": row,
                "stage_index": stage_index,
                "stage_finished": finished,
                "bad_epochs": bad_epochs,
                "best": best,
                "history": history,
            }
            if ctx.main:
                if improved:
                    save_checkpoint(out / f"best_{stage.name}.pt", payload)
                save_checkpoint(out / "last.pt", payload)
                _write_metrics(out, history)
                if epoch_hook is not None:
                    epoch_hook(history)
            _barrier(ctx)
            auc_text = "nan" if math.isnan(auc) else f"{auc:.4f}"
            info(
                f"{stage.name} epoch {epoch}/{stage.epochs}: train loss {train_loss:.4f}, val loss "
                f"{val['loss'] if val['loss'] is None else round(val['loss'], 4)}, val AUC {auc_text}"
                f"{' (best)' if improved else ''}, lr {lr:g}, {row['images_per_second']:.1f} img/s"
            )
            if stop_early:
                info(f"stage {stage.name}: no improvement for {bad_epochs} epochs; stopping early")
                break
        global_epoch += stage.epochs
        bad_epochs = 0

    summary = {
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "best": best,
        "epochs": len(history),
        "wall_seconds_last_session": time.perf_counter() - run_start,
        "checkpoints": {name: f"best_{name}.pt" for name in best},
    }
    if ctx.main:
        write_json_atomic(out / "done.json", summary)
    for name, b in best.items():
        line = f"best {name}: epoch {b['epoch']}, val AUC {b['val_auc_mean']}"
        if ctx.active:
            say(f"[rank {ctx.rank}] {line}")
        else:
            info(line)
    return summary


# --- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``cxrflow train`` options (also used by :func:`get_args_parser`)."""
    parser.add_argument("--store", help="store folder written by 'cxrflow etl'")
    parser.add_argument("--size", type=int, help="image size to train at (one the store holds)")
    parser.add_argument("--model", help=f"model name: {', '.join(MODEL_NAMES)}")
    parser.add_argument("--out", required=True, help="run folder to create (or resume)")
    parser.add_argument("--stage", choices=STAGE_CHOICES, help="which stages to run (default both)")
    parser.add_argument("--epochs", type=int, nargs="+", metavar="E",
                        help="epochs per selected stage, in order; one value sets every stage")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, nargs="+", metavar="LR",
                        help="learning rate per selected stage, in order (kt, finetune); one value sets every stage")
    parser.add_argument("--pretrained", metavar="imagenet|none|PATH",
                        help="backbone weights: torchvision ImageNet (from $TORCH_HOME; the default), random, or a state dict file")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    parser.add_argument("--seed", type=options.seed)
    parser.add_argument("--config", metavar="FILE", help="settings file (.json, .yaml, .toml)")
    parser.add_argument("--preset", choices=PRESETS, help="starting settings (default: 'default')")
    parser.add_argument("--device", choices=DEVICES, help="auto = cuda when available")
    parser.add_argument("--num-workers", type=int, help="loader worker processes")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other setting, e.g. --set optimizer=sgd --set finetune.lr=1e-4 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (for logs)")
    parser.add_argument("--uncertain", metavar="|".join(UNCERTAIN_POLICIES),
                        help="uncertain labels (stores that have them): ignore (U-Ignore, default), ones or zeros, "
                             "optionally per finding: zeros,Atelectasis=ones,Edema=ones")
    add_tracking_arguments(parser)
    sparktrain.add_arguments(parser)
    parser.add_argument("--fusion", metavar="|".join(FUSIONS),
                        help="demographics: fuse age, sex and view with the image features (default none)")
    parser.add_argument("--grad-checkpointing", action="store_true", default=None,
                        help="activation checkpointing: less memory, about a third more compute (densenet121, resnet50)")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """A standalone parser for the train options (for other entry points)."""
    parser = argparse.ArgumentParser(description="cxrflow two-stage training", add_help=add_help)
    add_arguments(parser)
    return parser


def _per_stage(values: list | None, option: str, config_stages: list[str], field: str) -> dict[str, Any]:
    if not values:
        return {}
    if len(values) == 1:
        values = values * len(config_stages)
    if len(values) != len(config_stages):
        raise CxrflowError(
            f"{option} takes one value or one per stage ({', '.join(config_stages)}), got {len(values)}"
        )
    return {f"{name}.{field}": v for name, v in zip(config_stages, values)}


def _option_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given by --set and the named command-line options (None: not given)."""
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise CxrflowError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    options_given = {
        "store": args.store, "size": args.size, "model": args.model, "out": args.out, "stage": args.stage,
        "batch_size": args.batch_size, "pretrained": args.pretrained, "seed": args.seed,
        "device": args.device, "num_workers": args.num_workers, "uncertain": args.uncertain, "fusion": args.fusion,
        "grad_checkpointing": args.grad_checkpointing,
    }  # fmt: skip
    overrides.update({k: v for k, v in options_given.items() if v is not None})  # an option not given keeps --set's value
    return overrides


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Preset -> --config file -> command-line options (later wins); validated."""
    overrides = _option_overrides(args)
    config = resolve_config(args.preset, args.config, overrides)
    names = [s.name for s in config.stages()]
    per_stage = {**_per_stage(args.epochs, "--epochs", names, "epochs"), **_per_stage(args.lr, "--lr", names, "lr")}
    if per_stage:
        config = resolve_config(args.preset, args.config, {**overrides, **per_stage})
    return config


#: Settings ``--resume`` lets differ from the saved run: where it runs, not what it computes.
RESUME_MAY_DIFFER = ("out", "device", "num_workers", "eval_batch_size")


def _resume_config(args: argparse.Namespace) -> TrainConfig | None:
    """The saved config of the run in --out, or None without one.

    Only :data:`RESUME_MAY_DIFFER` may be changed on resuming; any other option given (on the
    command line, by --set, --config or --preset) that differs from the saved run would change the
    result (the batch order, the model, the schedule) and is refused, naming it.
    """
    path = Path(args.out) / "config.json"
    if not path.exists():
        return None
    saved = read_json_object(path, "run config")
    missing = [key for key in ("store", "size", "model") if key not in saved]
    if missing:
        raise CxrflowError(f"run config field {missing[0]!r} is missing; start again with --overwrite", path)
    try:
        config = config_from_dict(saved)
        config.out = args.out
        config.validate()  # a damaged file names itself, not an option the user never gave
    except CxrflowError as exc:
        raise CxrflowError(exc.message, path) from None
    return _checked_resume_config(args, config, saved)


def _checked_resume_config(args: argparse.Namespace, saved: TrainConfig, saved_dict: dict) -> TrainConfig:
    """The saved config with the options given to --resume applied; a CxrflowError naming every
    one that differs from the saved run outside :data:`RESUME_MAY_DIFFER`.

    A different --store is accepted when it holds the same splits (a moved store), by identity.
    """
    from cxrflow.modelling.config import apply_overrides, read_config_file

    requested = config_from_dict(saved.to_dict())
    changed: list[str] = []
    saved_preset = saved_dict.get("preset") or "default"
    if args.preset and args.preset != saved_preset:
        changed.append(f"preset (saved {saved_preset}, given {args.preset})")
    if args.config:
        apply_overrides(requested, {k: v for k, v in read_config_file(args.config).items() if k != "preset"}, str(args.config))
    apply_overrides(requested, {k: v for k, v in _option_overrides(args).items() if v is not None})
    names = [s.name for s in saved.stages()]
    apply_overrides(requested, {**_per_stage(args.epochs, "--epochs", names, "epochs"), **_per_stage(args.lr, "--lr", names, "lr")})
    requested.validate()
    before, after = saved.to_dict(), requested.to_dict()
    if after["store"] != before["store"] and _same_splits(after["store"], saved_dict):
        before["store"] = after["store"]  # the same data at a new place
    for key, value in after.items():
        if key not in RESUME_MAY_DIFFER and value != before[key]:
            changed.append(f"{key} (saved {_shown(before[key])}, given {_shown(value)})")
    if changed:
        raise CxrflowError(
            f"--resume continues the run with its saved settings, but these options differ and would change the "
            f"result: {'; '.join(changed)}. Drop them (only {', '.join(RESUME_MAY_DIFFER[1:])} may change) "
            "or start again with --overwrite",
            args.out,
        )
    return requested


def _same_splits(store: str, saved: dict) -> bool:
    """Whether ``store`` holds exactly the splits the saved run was trained on (its store moved)."""
    recorded = saved.get("store_identity")
    if not recorded:
        return False
    try:
        return store_identity(store, read_manifest(store), int(saved["size"])) == recorded
    except (CxrflowError, KeyError, OSError):
        return False


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} {v}" for k, v in value.items()) + "}"
    return str(value)


def run_config(args: argparse.Namespace) -> TrainConfig:
    """The config a ``cxrflow train`` command runs: the saved one when resuming, else the options'."""
    return (_resume_config(args) if args.resume else None) or config_from_args(args)


def run(args: argparse.Namespace) -> int:
    if args.resume and args.overwrite:
        raise CxrflowError("--resume and --overwrite exclude each other")
    launch = sparktrain.launch_from_args(args)
    request = request_from_args(args)
    config = run_config(args)
    options = {"resume": args.resume, "overwrite": args.overwrite, "quiet": args.quiet}
    if launch is not None:
        sparktrain.train_on_spark(config, launch, tracking=request, **options)
    else:
        run_process(config, tracking=request, **options)
    return 0


def run_process(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, quiet: bool = False,
                tracking: TrackingRequest | None = None) -> dict:
    """One training process, however it was started (alone, torchrun, Spark's TorchDistributor)."""
    ctx = setup_distributed(config.device)
    try:
        with tracked_training(tracking, config.out, enabled=ctx.main) as epoch_hook:
            return train(config, resume=resume, overwrite=overwrite, quiet=quiet, ctx=ctx, epoch_hook=epoch_hook)
    finally:
        if ctx.active and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """``python -m cxrflow.modelling.train ...`` (same as ``cxrflow train ...``)."""
    from cxrflow.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
