"""Inference: one place that turns uint8 images into logits, for a batch or for a whole store split.

Training's validation, ``evaluate``, ``predict`` and what builds on them (localization, ensembles,
calibration) all score through here, so a checkpoint gives the same numbers wherever it is used:

- :func:`resolve_device`: ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` to a :class:`torch.device`, with
  one clear error for a device that is not there.
- :func:`resolve_inference`: a checkpoint loaded for scoring (:class:`Inference`) with everything its
  inputs need, all from the checkpoint: size, findings, the pixel statistics it was trained with,
  device and precision. ``evaluate``, ``predict``, ``localize`` and the report all load through it.
- :func:`model_input`: uint8 ``[N, 1, S, S]`` -> normalised float on the device (channels_last on CUDA).
- :func:`batch_logits`: one forward pass (bf16 autocast on CUDA), logits as float32 on the CPU;
  demographics (:mod:`cxrflow.data.demographics`) go with the images, for the models that fuse them.
- :func:`predict_split`: every row of a store split, in the store's order, with copies of labels and
  ids (never views into the loader's batch buffers, so memory does not grow with the split).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cxrflow.data.loader import make_loader, to_model_input
from cxrflow.data.store import check_partition, pixel_stats, read_manifest, run_store, store_identity
from cxrflow.data.uncertain import masked_bce
from cxrflow.errors import CxrflowError
from cxrflow.identity import file_sha256

#: Device choices every command accepts (``cuda:N`` too).
DEVICES = ("auto", "cpu", "cuda")

_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def resolve_device(choice: str | torch.device | None) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda``/``cuda:N`` without that GPU is an error."""
    if isinstance(choice, torch.device):
        return choice
    choice = "auto" if choice is None else str(choice)
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    index = _CUDA_INDEX.fullmatch(choice)
    if choice == "cuda" or index:
        if not torch.cuda.is_available():
            raise CxrflowError(f"--device {choice} but no CUDA GPU is available; use --device cpu or auto")
        if index and int(index.group(1)) >= torch.cuda.device_count():
            raise CxrflowError(f"--device {choice} but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
        return torch.device(choice)
    raise CxrflowError(f"unknown device {choice!r}; use auto, cpu, cuda or cuda:N")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def compute_dtype(device: torch.device) -> torch.dtype:
    """The precision a forward pass runs in on ``device``: bfloat16 on CUDA, float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op context on CPU (float32 there)."""
    return torch.autocast(device_type=device.type, dtype=compute_dtype(device), enabled=device.type == "cuda")


def model_input(images: torch.Tensor, mean: float, std: float, device: torch.device) -> torch.Tensor:
    """uint8 ``[N, 1, S, S]`` -> device (non-blocking) -> normalised 3-channel float; channels_last on CUDA."""
    x = to_model_input(images.to(device, non_blocking=True), mean, std, channels=3)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def batch_logits(
    model: nn.Module,
    images: torch.Tensor,
    mean: float,
    std: float,
    device: torch.device,
    demographics: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``float32[N, K]`` on the CPU for one uint8 batch (the model is used as it is: call ``eval()`` first).

    ``demographics`` float32 ``[N, 3]`` (NaN = unknown) is required by fused models, ignored by the others.
    """
    d = None if demographics is None else demographics.to(device, non_blocking=True)
    with torch.no_grad(), autocast(device):
        out = model(model_input(images, mean, std, device), demographics=d)
    return out.float().cpu()


def training_pixel_stats(config: dict, size: int) -> tuple[float, float]:
    """The pixel (mean, std) a model was trained with, from its checkpoint's config.

    Evaluation and prediction normalise with these, never with a store's current manifest (a
    rebuilt store must not change a model's inputs). Only a checkpoint written before they were
    recorded falls back to the manifest of the store it names.
    """
    if "pixel_mean" in config and "pixel_std" in config:
        mean, std = config["pixel_mean"], config["pixel_std"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (mean, std)) or not (
            0 <= mean <= 1 and 0 < std <= 1
        ):  # also NaN, which fails every comparison
            raise CxrflowError(
                f"the checkpoint's pixel_mean {mean!r:.40} / pixel_std {std!r:.40} are not a mean in 0..1 and a "
                "std in (0, 1]: the file is damaged"
            )
        return float(mean), float(std)
    store = config.get("store")
    if store:
        try:
            return pixel_stats(read_manifest(store), size)
        except (CxrflowError, KeyError):
            pass
    raise CxrflowError(
        "the checkpoint does not record the training pixel mean/std and its store is not readable; "
        "pass --store with the store the run was trained on"
    )


@dataclass
class Inference:
    """A checkpoint loaded for scoring and what its inputs need, all from the checkpoint itself."""

    model: nn.Module  # in eval mode, on ``device``
    checkpoint: dict  # the checkpoint dict: config, label_names, stage, epoch, ...
    path: Path
    sha256: str  # of the checkpoint file's bytes, hashed just before loading them
    size: int
    label_names: list[str]
    pixel_mean: float  # the normalisation the model was trained with
    pixel_std: float
    store_given: Path | None  # ``--store``, when given
    device: torch.device
    dtype: torch.dtype  # the precision of a forward pass (:func:`compute_dtype`)

    @property
    def config(self) -> dict:
        return dict(self.checkpoint.get("config") or {})

    @functools.cached_property
    def store(self) -> Path:
        """The run's store: ``--store`` as given, else the one the checkpoint names, found where it
        moved (:func:`run_store`); asked for only by what reads the store (predict does not)."""
        return run_store(self.config, self.store_given, run=self.path.parent)


def resolve_inference(
    checkpoint: str | os.PathLike, store: str | os.PathLike | None = None, *, device: str | torch.device = "auto"
) -> Inference:
    """Load the ``checkpoint`` file for scoring, on ``device``.

    Size, findings and the pixel statistics come from the checkpoint (what it was trained with),
    never from a store's current manifest. ``store`` is where the run's store is now, when it moved
    (default: the one the checkpoint names, :func:`run_store`); only a checkpoint written before pixel
    statistics were recorded falls back to that store's train statistics (:func:`training_pixel_stats`).
    """
    from cxrflow.modelling.models import load_checkpoint

    device = resolve_device(device)
    path = Path(checkpoint)
    if not path.is_file():
        raise CxrflowError("no such checkpoint", path)
    sha256 = file_sha256(path)
    model, ckpt = load_checkpoint(path, map_location=device)
    config = dict(ckpt.get("config") or {})
    if "size" not in config:
        raise CxrflowError("checkpoint config has no 'size'", path)
    size = int(config["size"])
    given = None if store is None else Path(store)
    old = "pixel_mean" not in config or "pixel_std" not in config  # an older version's: its store's statistics
    try:
        mean, std = training_pixel_stats(
            {**config, "store": str(_store_or_none(config, given, path))} if old else config, size
        )
    except CxrflowError as exc:
        raise CxrflowError(exc.message, path) from None
    return Inference(model.eval(), ckpt, path, sha256, size, list(ckpt["label_names"]), mean, std, given, device,
                     compute_dtype(device))  # fmt: skip


def _store_or_none(config: dict, given: Path | None, path: Path) -> Path | str:
    try:
        return run_store(config, given, run=path.parent)
    except CxrflowError:
        return ""


def check_label_names(label_names: list, manifest: dict, checkpoint: str | os.PathLike) -> None:
    """The model's outputs are read in the store's finding order: a checkpoint whose findings are
    not the store's, in the same order, would score each output against another finding's labels."""
    ours, store = [str(n) for n in label_names], [str(n) for n in manifest.get("label_names") or []]
    if ours != store:
        i = next((i for i, (a, b) in enumerate(zip(ours, store)) if a != b), min(len(ours), len(store)))
        where = (
            f"output {i + 1} is {ours[i]!r:.60} in the checkpoint, {store[i]!r:.60} in the store"
            if i < min(len(ours), len(store))
            else f"{len(ours)} findings in the checkpoint, {len(store)} in the store"
        )
        raise CxrflowError(
            f"the checkpoint's findings are not the store's in the same order ({where}); "
            "pass the store this run was trained on with --store",
            checkpoint,
        )


def check_store_identity(config: dict, store: Path, manifest: dict, size: int, splits: Sequence[str]) -> dict[str, str]:
    """The identity of ``splits`` of ``store``; an error when one differs from what the run was
    trained with (another dataset's store, or a store rebuilt from other images or labels)."""
    now = store_identity(store, manifest, size)
    trained = config.get("store_identity") or {}
    for split in dict.fromkeys(splits):
        if trained.get(split) and now.get(split) != trained[split]:
            raise CxrflowError(
                f"the store's {split} split is not the one this run was trained with (other image ids or "
                "labels); pass the run's own store with --store, or evaluate a run trained on this store",
                store,
            )
    return {split: now[split] for split in dict.fromkeys(splits) if split in now}


def predict_split(
    model: nn.Module,
    store: str | os.PathLike,
    size: int,
    split: str,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pixel_mean: float | None = None,
    pixel_std: float | None = None,
    uncertain: str = "ignore",
) -> dict[str, Any]:
    """Score a whole split: ``image_id``, ``patient_id`` int64[N], ``labels``, ``logits`` and ``probs``
    float32[N, K], ``loss`` (mean BCE with the store's pos_weight, or None without one).

    ``pixel_mean``/``pixel_std`` are the normalisation the model was trained with (from its
    checkpoint); without them the store's train statistics are used (training's own validation).
    ``uncertain`` is the policy for a store's uncertain labels (:mod:`cxrflow.data.uncertain`). The
    store may label other findings than the model predicts (another collection's): then ``labels``
    are the store's and ``loss`` is None. With ``world_size > 1`` (inside a process group) each rank scores its shard and the results are
    gathered, so every rank returns the same complete arrays.
    """
    device = resolve_device(device)
    net = unwrap(model).to(device)
    manifest = read_manifest(store)
    check_partition(manifest, store, size, split)
    if int(manifest["rows"][str(int(size))][split]) == 0:
        raise CxrflowError(f"split {split!r} at size {size} is empty", store)
    if pixel_mean is None or pixel_std is None:
        pixel_mean, pixel_std = pixel_stats(manifest, size)
    loader = make_loader(
        store,
        size,
        split,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        uncertain=uncertain,
    )
    ids: list[str] = []
    patients, labels, logits, known = [], [], [], []
    was_training = net.training
    net.eval()
    try:
        for batch in loader:
            logits.append(batch_logits(net, batch["image"], pixel_mean, pixel_std, device, batch["demographics"]))
            # copies: the batch's tensors are views into a recycled buffer that also holds its pixels
            labels.append(batch["labels"].clone())
            known.append(batch["known"].clone())
            patients.append(batch["patient_id"].clone())
            ids.extend(str(i) for i in batch["image_id"])
    finally:
        net.train(was_training)
    k = len(manifest.get("label_names") or []) or net.num_classes
    part = {
        "image_id": ids,
        "patient_id": torch.cat(patients).numpy() if patients else np.zeros(0, np.int64),
        "labels": torch.cat(labels).numpy() if labels else np.zeros((0, k), np.float32),
        "known": torch.cat(known).numpy() if known else np.zeros((0, k), np.float32),
        "logits": torch.cat(logits).numpy() if logits else np.zeros((0, net.num_classes), np.float32),
    }
    if world_size > 1:
        part = _gathered(part, world_size)
    return {
        "image_id": part["image_id"],
        "patient_id": part["patient_id"].astype(np.int64),
        "labels": part["labels"].astype(np.float32),
        "known": part["known"].astype(np.float32),
        "logits": part["logits"].astype(np.float32),
        "probs": torch.sigmoid(torch.from_numpy(part["logits"])).numpy().astype(np.float32),
        "loss": _split_loss(part, manifest.get("pos_weight"), k, store) if k == net.num_classes else None,
    }


def _gathered(part: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Every rank's shard of a scored split, concatenated in rank order (the same on every rank)."""
    parts: list[Any] = [None] * world_size
    dist.all_gather_object(parts, part)
    return {
        "image_id": [i for p in parts for i in p["image_id"]],
        **{key: np.concatenate([p[key] for p in parts]) for key in ("patient_id", "labels", "logits", "known")},
    }


def _split_loss(part: dict[str, Any], pos_weight: list | None, k: int, store: str | os.PathLike) -> float | None:
    """Mean BCE of a scored split with the store's ``pos_weight`` (None without one); labels that are
    not known are left out (:mod:`cxrflow.data.uncertain`)."""
    if pos_weight is None:
        return None
    if len(pos_weight) != k:
        raise CxrflowError(f"manifest pos_weight must have {k} values (one per finding)", store)
    logits = torch.from_numpy(part["logits"]).double()
    labels = torch.from_numpy(part["labels"]).double()
    criterion = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, dtype=torch.float64))
    if part["known"].all():
        return float(criterion(logits, labels))
    return float(masked_bce(logits, labels, torch.from_numpy(part["known"]).double(), criterion.pos_weight))
