"""Streaming Parquet-to-PyTorch loader for the cxrflow store.

Reads one (size, split) partition row group by row group with pyarrow, so memory stays at about
(shuffle buffer + a row group or two per worker) whatever the store's size. Each epoch:

1. the partition's row groups (the *units*) are listed once from the Parquet footers;
2. their order is shuffled with a generator seeded from ``(seed, epoch)``;
3. the rows, laid end to end in that order, form one index space that is cut into contiguous
   slices, one per rank, and each rank's slice into blocks of whole batches, one per DataLoader
   worker; a worker reads only the row groups its slice touches and keeps only its rows. Every row
   of the split is therefore read by exactly one (rank, worker), however many workers there are
   compared with files or row groups;
4. each worker reads row groups into a *window* of at least its share of the shuffle buffer,
   permutes the window's rows (seeded from seed, epoch, rank and worker) and yields whole batches;
   the fewer than one batch of rows left over open the next window. So each rank yields at most
   one short batch per epoch.

Speed: decoded row groups stay zero-copy numpy views of the Arrow buffers, and each value is
copied once, from there straight into the batch's tensors. A batch's tensors share one packed
buffer, reused once the consumer has dropped the batch (in a worker, a shared-memory buffer that
the main process hands back), so steady-state batches cost no page faults.

The reading (steps 1-3 and decoding) is :mod:`cxrflow.data.rowreader`, the windows, batches and
their buffers are :mod:`cxrflow.data.batching`; this module runs them in each DataLoader worker.

Batches are dicts (see :func:`make_loader`). Images stay uint8 until :func:`to_model_input`, which
runs on the batch's device, so on a GPU the host-to-device copy is 4x smaller than float32.
:func:`augment` is the optional train-time geometric transform, also on the batch's device.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cxrflow.data.batching import POOL_SLOTS, LocalSlots, OneOff, SharedSlots, read_ahead, unpack, window_batches
from cxrflow.data.rowreader import (
    Plan,
    epoch_units,
    list_units,
    num_batches,
    rank_range,
    read_remote_manifest,
    read_rows,
    resolve_filesystem,
    worker_range,
)
from cxrflow.data.store import check_partition, read_manifest
from cxrflow.data.uncertain import resolve_policy
from cxrflow.errors import CxrflowError

#: Default shuffle buffer, in pixel bytes per rank, shared among its DataLoader workers: 512 rows
#: at 512 px (two of the ETL's row groups), 2048 at 256 px; memory stays the same at every size.
DEFAULT_SHUFFLE_BUFFER_BYTES = 128 * 2**20


def default_shuffle_buffer(size: int, batch_size: int) -> int:
    """Rows of the default shuffle buffer at ``size`` (never less than one batch)."""
    return max(int(batch_size), DEFAULT_SHUFFLE_BUFFER_BYTES // (int(size) * int(size)))


_ERROR_KEY = "_cxrflow_error"
_PACKED_KEY = "_cxrflow_packed"
_SLOT_KEY = "_cxrflow_slot"


# --------------------------------------------------------------------------------------------
# The dataset each DataLoader worker runs, and the loader object


class _StoreStream(IterableDataset):
    """One rank's share of one epoch; each DataLoader worker takes its own block of batches.

    With ``busy`` (set by :class:`StoreLoader`, one row of flags per worker in shared memory) the
    workers reuse their output buffers and send each batch packed; the main process unpacks it.
    """

    def __init__(
        self,
        plan: Plan,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        drop_last: bool,
        shuffle_buffer: int,
        busy: torch.Tensor | None = None,
    ):
        super().__init__()
        self.plan = plan
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, epoch
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.shuffle_buffer = shuffle_buffer
        self.busy = busy

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is None:
            slots: Any = LocalSlots()
        elif self.busy is not None:
            slots = SharedSlots(self.busy[worker].numpy())
        else:
            slots = OneOff(shared=True)
        try:
            for batch, packed, slot in self._batches(worker, workers, in_worker=info is not None, slots=slots):
                if info is not None and self.busy is not None:
                    yield {
                        _PACKED_KEY: packed,
                        _SLOT_KEY: (worker, slot, len(batch["image_id"])),
                        "image_id": batch["image_id"],
                    }
                else:
                    yield batch
        except CxrflowError as exc:
            if info is None:
                raise
            # Travels to the main process as data, so the user sees one clean line, not a worker traceback.
            yield {_ERROR_KEY: (exc.message, exc.path, exc.line)}

    def _batches(
        self, worker: int, workers: int, in_worker: bool, slots: Any
    ) -> Iterator[tuple[dict[str, Any], torch.Tensor, int]]:
        units = epoch_units(self.plan.units, self.shuffle, self.seed, self.epoch)
        total = sum(u.n_rows for u in units)
        rank_lo, rank_hi = rank_range(total, self.rank, self.world_size, self.drop_last)
        lo, hi = worker_range(rank_hi - rank_lo, self.batch_size, self.drop_last, worker, workers)
        if hi <= lo:
            return
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 1])
            window = min(-(-self.shuffle_buffer // workers), hi - lo)  # the rank's buffer, shared by its workers
        else:
            rng, window = None, self.batch_size
        blocks = read_rows(self.plan, units, rank_lo + lo, rank_lo + hi, use_threads=not in_worker)
        if not in_worker:  # read the next window while this one is batched (workers overlap with each other)
            blocks = read_ahead(blocks, max(window, self.batch_size))
        yield from window_batches(
            blocks, self.batch_size, hi - lo, window, self.plan.size, self.plan.num_labels, rng=rng, slots=slots
        )


class StoreLoader:
    """Iterable of batches over one (size, split) partition for one rank; see :func:`make_loader`.

    ``len()`` is the number of batches this rank yields per epoch. Call :meth:`set_epoch` before each
    epoch to reshuffle (iterating again without it repeats the same order). DataLoader workers are
    started afresh by every iteration, so the loader object can be reused across epochs.
    """

    def __init__(
        self,
        plan: Plan,
        manifest: dict,
        *,
        split: str,
        batch_size: int,
        shuffle: bool,
        seed: int,
        epoch: int,
        num_workers: int,
        rank: int,
        world_size: int,
        drop_last: bool,
        shuffle_buffer: int,
        pin_memory: bool,
    ):
        self.plan = plan
        self.manifest = manifest
        self.size, self.split = plan.size, split
        self.label_names: list[str] = list(manifest["label_names"])
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, epoch
        self.num_workers, self.rank, self.world_size = num_workers, rank, world_size
        self.drop_last, self.shuffle_buffer, self.pin_memory = drop_last, shuffle_buffer, pin_memory
        #: Rows in the whole partition, and rows this rank yields per epoch.
        self.total_rows = sum(u.n_rows for u in plan.units)
        lo, hi = rank_range(self.total_rows, rank, world_size, drop_last)
        self.num_batches = num_batches(hi - lo, batch_size, drop_last)
        self.num_rows = min(hi - lo, self.num_batches * batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle the next iteration uses (like ``DistributedSampler``)."""
        if epoch < 0:
            raise CxrflowError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def dataset(self) -> _StoreStream:
        """The IterableDataset for the current epoch (for callers building their own DataLoader)."""
        return self._dataset(None)

    def _dataset(self, busy: torch.Tensor | None) -> _StoreStream:
        return _StoreStream(
            self.plan,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            drop_last=self.drop_last,
            shuffle_buffer=self.shuffle_buffer,
            busy=busy,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Workers' reusable output buffers: a flag per buffer, set by the worker that fills it and
        # cleared here once no tensor of that batch is left (or once it was copied to pinned memory).
        if self.num_workers == 0 and not self.pin_memory:  # DataLoader would only add per-batch overhead
            yield from self._dataset(None)
            return
        busy = None
        if self.num_workers:
            busy = torch.zeros((self.num_workers, POOL_SLOTS), dtype=torch.int8).share_memory_()
        loader = DataLoader(
            self._dataset(busy),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
        held: list[tuple[StorageWeakRef, int, int]] = []
        for item in loader:
            if _ERROR_KEY in item:
                message, path, line = item[_ERROR_KEY]
                raise CxrflowError(message, path, line)
            if _PACKED_KEY not in item:
                yield item
                continue
            packed, (worker, slot, n) = item[_PACKED_KEY], item[_SLOT_KEY]
            batch = {**unpack(packed, n, self.size, len(self.label_names)), "image_id": item["image_id"]}
            if slot >= 0:
                if packed.is_pinned():  # the pin-memory thread copied it: the shared buffer is free now
                    busy[worker, slot] = 0
                else:
                    held.append((StorageWeakRef(packed.untyped_storage()), worker, slot))
            del item, packed
            still = []
            for ref, w, k in held:
                if ref.expired():
                    busy[w, k] = 0
                else:
                    still.append((ref, w, k))
            held = still
            yield batch
            del batch


def make_loader(
    store: str | os.PathLike,
    size: int,
    split: str,
    *,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    shuffle_buffer: int | None = None,
    filesystem: Any = None,
    pin_memory: bool | None = None,
    uncertain: str = "ignore",
) -> StoreLoader:
    """Stream batches of the store's ``(size, split)`` partition.

    Each batch is a dict: ``image`` uint8 [N, 1, S, S]; ``labels`` float32 [N, K] (manifest order);
    ``image_id`` list of N str; ``patient_id`` int64 [N]; ``demographics`` float32 [N, 3] =
    (age / 100, sex M=0 F=1, view PA=0 AP=1), NaN where unknown (:mod:`cxrflow.data.demographics`); ``known`` float32 [N, K]: 1 where the label counts
    (all ones for stores whose labels are all known; otherwise per ``uncertain``, see
    :mod:`cxrflow.data.uncertain`: ``ignore`` keeps only certain labels, ``ones``/``zeros`` set the
    uncertain ones; labels not mentioned are never known).

    ``store`` is a local folder, a URL pyarrow understands (``file://``, ``s3://``, ``gs://``,
    ``hdfs://``) or any fsspec URL; or pass ``filesystem`` (pyarrow or fsspec) and a path inside it.
    Order is a pure function of (seed, epoch, num_workers, world_size); ``shuffle=False`` with
    ``num_workers=0`` gives file order. For DDP pass ``rank=dist.get_rank(),
    world_size=dist.get_world_size()``: ranks together cover every row exactly once; with
    ``drop_last=False`` their batch counts may differ by one (use ``drop_last=True`` for equal
    counts, which drops fewer than ``world_size * batch_size`` rows per epoch). ``shuffle_buffer`` is
    in rows per rank (default: :func:`default_shuffle_buffer`, 128 MiB of pixels), divided among its workers (so memory does not grow with ``num_workers``):
    each worker permutes windows of that many rows, read a whole row group at a time. ``pin_memory``
    defaults to whether CUDA is available.
    """
    shuffle_buffer = _check_loader_args(size, batch_size, num_workers, world_size, rank, seed, epoch, shuffle_buffer)
    plan, manifest = _plan_partition(store, filesystem, size, split, uncertain)
    return StoreLoader(
        plan,
        manifest,
        split=split,
        batch_size=int(batch_size),
        shuffle=bool(shuffle),
        seed=int(seed),
        epoch=int(epoch),
        num_workers=int(num_workers),
        rank=int(rank),
        world_size=int(world_size),
        drop_last=bool(drop_last),
        shuffle_buffer=int(shuffle_buffer),
        pin_memory=torch.cuda.is_available() if pin_memory is None else bool(pin_memory),
    )


def _check_loader_args(
    size: Any,
    batch_size: Any,
    num_workers: Any,
    world_size: Any,
    rank: Any,
    seed: Any,
    epoch: Any,
    shuffle_buffer: Any,
) -> Any:
    """:func:`make_loader`'s integer arguments checked; returns ``shuffle_buffer`` (its default filled in)."""
    if shuffle_buffer is None and isinstance(size, (int, np.integer)) and size > 0:
        shuffle_buffer = default_shuffle_buffer(size, batch_size if isinstance(batch_size, int) else 1)
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("num_workers", num_workers, 0),
        ("world_size", world_size, 1),
        ("seed", seed, 0),
        ("epoch", epoch, 0),
        ("shuffle_buffer", shuffle_buffer, 0),
    ):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise CxrflowError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise CxrflowError(f"rank must be in 0..{world_size - 1} for world_size {world_size}, got {rank!r}")
    return shuffle_buffer


def _plan_partition(
    store: str | os.PathLike, filesystem: Any, size: int, split: str, uncertain: str
) -> tuple[Plan, dict]:
    """The store's manifest and the read plan of its ``(size, split)`` partition, whose row groups
    must hold exactly the rows the manifest records."""
    fs, root, local = resolve_filesystem(store, filesystem)
    shown = os.fspath(store)
    manifest = read_manifest(root) if local else read_remote_manifest(fs, root, shown)
    check_partition(manifest, shown, size, split)
    folder = f"{root}/size={int(size)}/split={split}"
    units = list_units(fs, folder)
    expected = int(manifest["rows"][str(int(size))][split])
    found = sum(u.n_rows for u in units)
    if found != expected:
        raise CxrflowError(
            f"size {size} split {split!r} holds {found} rows in its Parquet files but the manifest says {expected}; "
            "the store is incomplete or was modified (re-run 'cxrflow etl')",
            folder,
        )
    plan = Plan(
        filesystem=fs,
        units=tuple(units),
        size=int(size),
        num_labels=len(manifest["label_names"]),
        has_states="uncertain_policies" in manifest,
        uncertain=resolve_policy(uncertain, manifest["label_names"]),
    )
    return plan, manifest


# --------------------------------------------------------------------------------------------
# Transforms on the batch's device


def to_model_input(
    image: torch.Tensor, mean: float, std: float, channels: int = 3, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 [N, 1, S, S] -> float32 [N, channels, S, S], ``(x / 255 - mean) / std`` on image's device.

    ``mean`` and ``std`` are on the 0..1 scale, as in the manifest's ``pixel_stats``. The gray
    channel is copied into ``channels`` channels for ImageNet-style backbones. ``out`` (float32,
    same device and shape) is filled and returned instead of a new tensor: on the CPU, reusing one
    buffer across batches saves the page faults of a fresh 100 MB allocation per 512-px batch.
    """
    if image.dtype != torch.uint8 or image.dim() != 4 or image.shape[1] != 1:
        raise TypeError(f"expected a uint8 [N, 1, S, S] tensor, got {image.dtype} {tuple(image.shape)}")
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    n, _, h, w = image.shape
    if out is None:
        out = torch.empty((n, channels, h, w), dtype=torch.float32, device=image.device)
    elif out.shape != (n, channels, h, w) or out.dtype != torch.float32 or out.device != image.device:
        raise ValueError(
            f"out must be float32 {(n, channels, h, w)} on {image.device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}"
        )
    first = out[:, :1]
    torch.mul(image, 1.0 / (255.0 * std), out=first)
    first.sub_(mean / std)
    if channels > 1:
        out[:, 1:].copy_(first.expand(-1, channels - 1, -1, -1))
    return out


def augment(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    max_rotate: float = 7.0,
    max_scale: float = 0.1,
    max_translate: float = 0.05,
    hflip: bool = False,
) -> torch.Tensor:
    """Random small affine transform of a float batch [N, C, S, S] on its own device.

    Per image: rotation uniform in +-``max_rotate`` degrees, zoom uniform in 1 +- ``max_scale``,
    shift uniform in +-``max_translate`` of the side, and (only if ``hflip``) a left-right flip with
    probability 1/2 (off by default: the heart is on one side). Parameters are drawn from
    ``generator`` (on its own device), so a seeded generator reproduces the batch exactly. Areas
    moved in from outside the image are 0, i.e. the mean pixel after :func:`to_model_input`.
    """
    if not x.is_floating_point() or x.dim() != 4:
        raise TypeError(f"expected a float [N, C, S, S] tensor, got {x.dtype} {tuple(x.shape)}")
    n = x.shape[0]
    u = torch.rand((n, 5), generator=generator, device=generator.device, dtype=torch.float64).to(x.device) * 2 - 1
    angle = torch.deg2rad(u[:, 0] * max_rotate)
    scale = 1.0 + u[:, 1] * max_scale
    flip = torch.where(u[:, 4] < 0, -1.0, 1.0) if hflip else torch.ones_like(scale)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, u[:, 2] * 2 * max_translate], dim=1),
            torch.stack([sin * flip, cos, u[:, 3] * 2 * max_translate], dim=1),
        ],
        dim=1,
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
