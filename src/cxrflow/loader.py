"""Streaming Parquet-to-PyTorch loader for the cxrflow store.

Reads one (size, split) partition row group by row group with pyarrow, so memory stays at about
(shuffle buffer + a few row groups) per worker whatever the store's size. Each epoch:

1. the partition's row groups (the *units*) are listed once from the Parquet footers;
2. their order is shuffled with a generator seeded from ``(seed, epoch)``;
3. the rows, laid end to end in that order, form one index space that is cut into contiguous
   slices, one per rank, and each rank's slice into blocks of whole batches, one per DataLoader
   worker; a worker reads only the row groups its slice touches and keeps only its rows. Every row
   of the split is therefore read by exactly one (rank, worker), however many workers there are
   compared with files or row groups;
4. each worker mixes its rows in a shuffle buffer (seeded from seed, epoch, rank and worker) and
   yields whole batches, so each rank yields at most one short batch per epoch.

Batches are dicts (see :func:`make_loader`). Images stay uint8 until :func:`to_model_input`, which
runs on the batch's device, so on a GPU the host-to-device copy is 4x smaller than float32.
:func:`augment` is the optional train-time geometric transform, also on the batch's device.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cxrflow.errors import CxrflowError
from cxrflow.store import FORMAT_VERSION, MANIFEST_NAME, check_partition, read_manifest

#: Columns the loader reads; the others (follow_up, original size) are never decoded.
COLUMNS = ["image_id", "patient_id", "labels", "age", "sex", "view", "pixels"]

#: Default shuffle buffer, in rows per worker (about 256 MiB of pixels at 512 px, 64 MiB at 256 px).
DEFAULT_SHUFFLE_BUFFER = 1024

_ERROR_KEY = "_cxrflow_error"


# --------------------------------------------------------------------------------------------
# Where the store lives


@dataclass(frozen=True)
class _Unit:
    """One row group of one Parquet file: the smallest piece the loader reads."""

    path: str
    row_group: int
    n_rows: int


@dataclass(frozen=True)
class _Plan:
    """What every worker needs to find its rows; identical in all ranks and workers."""

    filesystem: pafs.FileSystem
    units: tuple[_Unit, ...]
    size: int
    num_labels: int


def _resolve_filesystem(store: str | os.PathLike, filesystem: Any) -> tuple[pafs.FileSystem, str, bool]:
    """(pyarrow filesystem, root path inside it, is-local) for a local path, a URL or a given filesystem."""
    if filesystem is not None:
        if not isinstance(filesystem, pafs.FileSystem):  # an fsspec filesystem
            filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(filesystem))
        return filesystem, str(store).rstrip("/"), isinstance(filesystem, pafs.LocalFileSystem)
    text = os.fspath(store)
    if "://" in text:
        try:
            fs, root = pafs.FileSystem.from_uri(text)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            try:
                import fsspec
            except ImportError:  # pragma: no cover - fsspec ships with torch
                raise CxrflowError("unsupported filesystem URL (install fsspec for more schemes)", text) from None
            try:
                fsspec_fs, root = fsspec.core.url_to_fs(text)
            except (ValueError, ImportError) as exc:
                raise CxrflowError(f"unsupported filesystem URL: {exc}", text) from None
            fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs))
        return fs, root.rstrip("/"), isinstance(fs, pafs.LocalFileSystem)
    return pafs.LocalFileSystem(), str(Path(text).absolute()), True


def _read_remote_manifest(fs: pafs.FileSystem, root: str, shown: str) -> dict:
    """The manifest of a store on a non-local filesystem, with the same checks as ``read_manifest``."""
    import json

    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise CxrflowError("no such store (run 'cxrflow etl' first)", shown)
    path = f"{root}/{MANIFEST_NAME}"
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise CxrflowError(f"not a complete cxrflow store: {MANIFEST_NAME} is missing", shown)
    try:
        with fs.open_input_stream(path) as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise CxrflowError(f"unreadable manifest: {exc}", f"{shown}/{MANIFEST_NAME}") from None
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CxrflowError(
            f"store format version {version} is newer than this cxrflow supports ({FORMAT_VERSION}); upgrade cxrflow",
            f"{shown}/{MANIFEST_NAME}",
        )
    return manifest


def _list_units(fs: pafs.FileSystem, folder: str) -> list[_Unit]:
    """Every row group of the partition's Parquet files, in file-name order."""
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    paths = sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and i.base_name.endswith(".parquet")
        and not i.base_name.startswith(("_", "."))
    )
    units = []
    for path in paths:
        try:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
        except (pa.ArrowException, OSError) as exc:
            raise CxrflowError(f"corrupt or unreadable Parquet file: {exc}", path) from None
        missing = [c for c in COLUMNS if c not in meta.schema.to_arrow_schema().names]
        if missing:
            raise CxrflowError(f"not a cxrflow store file: columns {missing} are missing", path)
        units.extend(_Unit(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups))
    return [u for u in units if u.n_rows > 0]


# --------------------------------------------------------------------------------------------
# Who reads which rows


def _rank_range(total: int, rank: int, world_size: int, drop_last: bool) -> tuple[int, int]:
    """[start, stop) of this rank's rows in the epoch's row index space."""
    if drop_last:
        per_rank = total // world_size  # equal shares, so every rank yields the same number of batches
        return rank * per_rank, (rank + 1) * per_rank
    return rank * total // world_size, (rank + 1) * total // world_size


def _num_batches(rows: int, batch_size: int, drop_last: bool) -> int:
    return rows // batch_size if drop_last else math.ceil(rows / batch_size)


def _worker_range(rank_rows: int, batch_size: int, drop_last: bool, worker: int, num_workers: int) -> tuple[int, int]:
    """[start, stop) of one worker's rows inside its rank's slice: a block of whole batches."""
    batches = _num_batches(rank_rows, batch_size, drop_last)
    used = min(rank_rows, batches * batch_size)
    first, last = worker * batches // num_workers, (worker + 1) * batches // num_workers
    return min(first * batch_size, used), min(last * batch_size, used)


def _epoch_units(units: Sequence[_Unit], shuffle: bool, seed: int, epoch: int) -> list[_Unit]:
    if not shuffle:
        return list(units)
    order = np.random.default_rng([seed, epoch]).permutation(len(units))
    return [units[i] for i in order]


# --------------------------------------------------------------------------------------------
# Decoding


@dataclass
class _Rows:
    """A block of decoded rows (numpy); images uint8 [n, S, S], labels uint8 [n, K]."""

    image: np.ndarray
    labels: np.ndarray
    patient_id: np.ndarray
    demographics: np.ndarray
    image_id: np.ndarray  # object array of str

    def __len__(self) -> int:
        return len(self.image_id)

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.image, self.labels, self.patient_id, self.demographics, self.image_id


def _offsets(array: pa.Array, n: int) -> np.ndarray:
    """Value offsets of a binary or list array as int64, honouring the array's slice offset."""
    wide = pa.types.is_large_binary(array.type) or pa.types.is_large_list(array.type)
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64 if wide else np.int32)
    return offsets[array.offset : array.offset + n + 1].astype(np.int64)


def _decode(batch: pa.RecordBatch, size: int, num_labels: int, path: str, first_row: int) -> _Rows:
    """Columns of one record batch to numpy without per-row Python work (except image ids)."""
    n = batch.num_rows
    ids = batch.column("image_id")

    def bad(row: int, problem: str) -> CxrflowError:
        return CxrflowError(f"row {first_row + row} (image_id {ids[row].as_py()}): {problem}", path)

    pixels = batch.column("pixels")
    if pixels.null_count:
        raise bad(int(np.flatnonzero(pixels.is_null().to_numpy(zero_copy_only=False))[0]), "pixels are null")
    offsets = _offsets(pixels, n)
    lengths = np.diff(offsets)
    wrong = np.flatnonzero(lengths != size * size)
    if len(wrong):
        row = int(wrong[0])
        raise bad(row, f"{lengths[row]} pixel bytes, expected {size * size} for size {size}")
    data = np.frombuffer(pixels.buffers()[2], dtype=np.uint8)
    image = data[offsets[0] : offsets[-1]].reshape(n, size, size)

    labels = batch.column("labels")
    lab_offsets = _offsets(labels, n)
    lab_lengths = np.diff(lab_offsets)
    wrong = np.flatnonzero(lab_lengths != num_labels)
    if labels.null_count or len(wrong):
        row = int(wrong[0]) if len(wrong) else 0
        raise bad(row, f"labels have {lab_lengths[row] if len(wrong) else 'null'} entries, expected {num_labels}")
    flat = labels.flatten()
    if flat.null_count:
        raise CxrflowError("null label values", path)
    label_values = flat.to_numpy(zero_copy_only=False).reshape(n, num_labels)

    demographics = np.empty((n, 3), dtype=np.float32)
    demographics[:, 0] = batch.column("age").to_numpy(zero_copy_only=False) / 100.0
    demographics[:, 1] = pc.equal(batch.column("sex"), "F").to_numpy(zero_copy_only=False)
    demographics[:, 2] = pc.equal(batch.column("view"), "AP").to_numpy(zero_copy_only=False)
    return _Rows(
        image=image,
        labels=label_values,
        patient_id=batch.column("patient_id").to_numpy(zero_copy_only=False),
        demographics=demographics,
        image_id=np.asarray(ids.to_pylist(), dtype=object),
    )


def _read_rows(plan: _Plan, units: Sequence[_Unit], start: int, stop: int, use_threads: bool) -> Iterator[_Rows]:
    """Rows [start, stop) of the index space formed by ``units`` end to end, row group by row group."""
    ends = np.cumsum([u.n_rows for u in units])
    first = int(np.searchsorted(ends, start, side="right"))
    open_path, open_file = None, None
    try:
        for i in range(first, len(units)):
            unit, unit_start = units[i], int(ends[i]) - units[i].n_rows
            if unit_start >= stop:
                break
            lo, hi = max(start, unit_start) - unit_start, min(stop, int(ends[i])) - unit_start
            if unit.path != open_path:
                if open_file is not None:
                    open_file.close()
                open_path, open_file = unit.path, plan.filesystem.open_input_file(unit.path)
                parquet = pq.ParquetFile(open_file)
            try:
                table = parquet.read_row_group(unit.row_group, columns=COLUMNS, use_threads=use_threads)
            except (pa.ArrowException, OSError) as exc:
                raise CxrflowError(f"corrupt Parquet file (row group {unit.row_group}): {exc}", unit.path) from None
            if table.num_rows != unit.n_rows:
                raise CxrflowError(f"row group {unit.row_group} changed since the loader was made", unit.path)
            table = table.slice(lo, hi - lo)
            first_row = sum(parquet.metadata.row_group(g).num_rows for g in range(unit.row_group)) + lo
            for record_batch in table.to_batches():
                if record_batch.num_rows:
                    yield _decode(record_batch, plan.size, plan.num_labels, unit.path, first_row)
                    first_row += record_batch.num_rows
    finally:
        if open_file is not None:
            open_file.close()


# --------------------------------------------------------------------------------------------
# Shuffling and batching


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised CPU tensor; in shared memory inside a DataLoader worker, so that handing it
    to the main process costs no extra copy (the same trick as torch's default_collate)."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return proto.new(storage).view(shape)


class _Batch:
    """Output tensors of one batch, filled in place through numpy views (one copy per value)."""

    def __init__(self, n: int, size: int, num_labels: int, shared: bool):
        self.tensors = {
            "image": _empty((n, 1, size, size), torch.uint8, shared),
            "labels": _empty((n, num_labels), torch.float32, shared),
            "patient_id": _empty((n,), torch.int64, shared),
            "demographics": _empty((n, 3), torch.float32, shared),
        }
        t = self.tensors
        self.views = (t["image"].numpy().reshape(n, size, size), t["labels"].numpy(), t["patient_id"].numpy(),
                      t["demographics"].numpy(), np.empty(n, dtype=object))

    def fill(self, at: slice, rows: tuple[np.ndarray, ...], index: np.ndarray | slice) -> None:
        """Copy ``rows[index]`` into positions ``at`` of the batch."""
        for out, src in zip(self.views, rows):
            if isinstance(index, slice):
                out[at] = src[index]
            elif out.dtype == src.dtype and out.dtype != object:
                np.take(src, index, axis=0, out=out[at])
            else:
                out[at] = src[index]

    def result(self) -> dict[str, Any]:
        return {**self.tensors, "image_id": self.views[-1].tolist()}


def _in_order_batches(blocks: Iterator[_Rows], batch_size: int, total: int, size: int, num_labels: int,
                      shared: bool) -> Iterator[dict[str, Any]]:
    """Rows in stream order, cut into batches of ``batch_size`` (the last one may be short)."""
    remaining, batch, filled = total, None, 0
    for block in blocks:
        pos = 0
        while pos < len(block):
            if batch is None:
                batch, filled = _Batch(min(batch_size, remaining), size, num_labels, shared), 0
            n = len(batch.views[0])
            take = min(n - filled, len(block) - pos)
            batch.fill(slice(filled, filled + take), block.arrays(), slice(pos, pos + take))
            filled, pos = filled + take, pos + take
            if filled == n:
                remaining -= n
                yield batch.result()
                batch = None
    if batch is not None:
        raise AssertionError(f"stream ended {len(batch.views[0]) - filled} rows short")


class _ShuffleBuffer:
    """Fixed-capacity pool of rows. Incoming rows fill free slots; batches leave from random
    occupied slots, whose slots the next rows refill (so no row is ever moved inside the pool)."""

    def __init__(self, capacity: int, first: _Rows, rng: np.random.Generator):
        self.rng = rng
        self.arrays = [np.empty((capacity, *a.shape[1:]), dtype=a.dtype) for a in first.arrays()]
        self.occupied = np.zeros(capacity, dtype=bool)
        self.free = np.arange(capacity)

    def put(self, block: _Rows, rows: slice) -> None:
        count = rows.stop - rows.start
        slots, self.free = self.free[:count], self.free[count:]
        for pool, src in zip(self.arrays, block.arrays()):
            pool[slots] = src[rows]
        self.occupied[slots] = True

    def pop_into(self, batch: _Batch, at: slice, count: int) -> None:
        """Move ``count`` uniformly random rows of the pool into ``batch[at]``."""
        chosen = self.rng.choice(np.flatnonzero(self.occupied), count, replace=False)
        batch.fill(at, tuple(self.arrays), chosen)
        self.occupied[chosen] = False
        self.free = np.concatenate([self.free, chosen])


def _shuffled_batches(blocks: Iterator[_Rows], batch_size: int, total: int, capacity: int, size: int,
                      num_labels: int, rng: np.random.Generator, shared: bool) -> Iterator[dict[str, Any]]:
    """Rows mixed through a shuffle buffer of ``capacity`` rows, in batches of ``batch_size``."""
    capacity = max(capacity, batch_size)
    buffer: _ShuffleBuffer | None = None
    remaining = total
    for block in blocks:
        if buffer is None:
            buffer = _ShuffleBuffer(capacity, block, rng)
        pos = 0
        while pos < len(block):
            take = min(len(buffer.free), len(block) - pos)
            buffer.put(block, slice(pos, pos + take))
            pos += take
            if len(buffer.free) == 0:
                batch = _Batch(batch_size, size, num_labels, shared)
                buffer.pop_into(batch, slice(0, batch_size), batch_size)
                remaining -= batch_size
                yield batch.result()
    while remaining > 0:
        n = min(batch_size, remaining)
        batch = _Batch(n, size, num_labels, shared)
        buffer.pop_into(batch, slice(0, n), n)
        remaining -= n
        yield batch.result()


# --------------------------------------------------------------------------------------------
# The dataset each DataLoader worker runs, and the loader object


class _StoreStream(IterableDataset):
    """One rank's share of one epoch; each DataLoader worker takes its own block of batches."""

    def __init__(self, plan: _Plan, *, batch_size: int, shuffle: bool, seed: int, epoch: int, rank: int,
                 world_size: int, drop_last: bool, shuffle_buffer: int):
        super().__init__()
        self.plan = plan
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, epoch
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.shuffle_buffer = shuffle_buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        try:
            yield from self._batches(worker, workers, in_worker=info is not None)
        except CxrflowError as exc:
            if info is None:
                raise
            # Travels to the main process as data, so the user sees one clean line, not a worker traceback.
            yield {_ERROR_KEY: (exc.message, exc.path, exc.line)}

    def _batches(self, worker: int, workers: int, in_worker: bool) -> Iterator[dict[str, Any]]:
        units = _epoch_units(self.plan.units, self.shuffle, self.seed, self.epoch)
        total = sum(u.n_rows for u in units)
        rank_lo, rank_hi = _rank_range(total, self.rank, self.world_size, self.drop_last)
        lo, hi = _worker_range(rank_hi - rank_lo, self.batch_size, self.drop_last, worker, workers)
        if hi <= lo:
            return
        blocks = _read_rows(self.plan, units, rank_lo + lo, rank_lo + hi, use_threads=not in_worker)
        shape = dict(size=self.plan.size, num_labels=self.plan.num_labels, shared=in_worker)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 1])
            capacity = min(self.shuffle_buffer, hi - lo)
            yield from _shuffled_batches(blocks, self.batch_size, hi - lo, capacity, rng=rng, **shape)
        else:
            yield from _in_order_batches(blocks, self.batch_size, hi - lo, **shape)


class StoreLoader:
    """Iterable of batches over one (size, split) partition for one rank; see :func:`make_loader`.

    ``len()`` is the number of batches this rank yields per epoch. Call :meth:`set_epoch` before each
    epoch to reshuffle (iterating again without it repeats the same order). DataLoader workers are
    started afresh by every iteration, so the loader object can be reused across epochs.
    """

    def __init__(self, plan: _Plan, manifest: dict, *, split: str, batch_size: int, shuffle: bool, seed: int,
                 epoch: int, num_workers: int, rank: int, world_size: int, drop_last: bool,
                 shuffle_buffer: int, pin_memory: bool):
        self.plan = plan
        self.manifest = manifest
        self.size, self.split = plan.size, split
        self.label_names: list[str] = list(manifest["label_names"])
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, epoch
        self.num_workers, self.rank, self.world_size = num_workers, rank, world_size
        self.drop_last, self.shuffle_buffer, self.pin_memory = drop_last, shuffle_buffer, pin_memory
        #: Rows in the whole partition, and rows this rank yields per epoch.
        self.total_rows = sum(u.n_rows for u in plan.units)
        lo, hi = _rank_range(self.total_rows, rank, world_size, drop_last)
        self.num_batches = _num_batches(hi - lo, batch_size, drop_last)
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
        return _StoreStream(
            self.plan, batch_size=self.batch_size, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
            rank=self.rank, world_size=self.world_size, drop_last=self.drop_last,
            shuffle_buffer=self.shuffle_buffer,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = DataLoader(
            self.dataset(),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
        for batch in loader:
            if _ERROR_KEY in batch:
                message, path, line = batch[_ERROR_KEY]
                raise CxrflowError(message, path, line)
            yield batch


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
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    filesystem: Any = None,
    pin_memory: bool | None = None,
) -> StoreLoader:
    """Stream batches of the store's ``(size, split)`` partition.

    Each batch is a dict: ``image`` uint8 [N, 1, S, S]; ``labels`` float32 [N, K] (manifest order);
    ``image_id`` list of N str; ``patient_id`` int64 [N]; ``demographics`` float32 [N, 3] =
    (age / 100, sex M=0 F=1, view PA=0 AP=1).

    ``store`` is a local folder, a URL pyarrow understands (``file://``, ``s3://``, ``gs://``,
    ``hdfs://``) or any fsspec URL; or pass ``filesystem`` (pyarrow or fsspec) and a path inside it.
    Order is a pure function of (seed, epoch, num_workers, world_size); ``shuffle=False`` with
    ``num_workers=0`` gives file order. For DDP pass ``rank=dist.get_rank(),
    world_size=dist.get_world_size()``: ranks together cover every row exactly once; with
    ``drop_last=False`` their batch counts may differ by one (use ``drop_last=True`` for equal
    counts, which drops fewer than ``world_size * batch_size`` rows per epoch). ``shuffle_buffer`` is
    in rows per worker. ``pin_memory`` defaults to whether CUDA is available.
    """
    for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                             ("world_size", world_size, 1), ("seed", seed, 0), ("epoch", epoch, 0),
                             ("shuffle_buffer", shuffle_buffer, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise CxrflowError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise CxrflowError(f"rank must be in 0..{world_size - 1} for world_size {world_size}, got {rank!r}")
    fs, root, local = _resolve_filesystem(store, filesystem)
    shown = os.fspath(store)
    manifest = read_manifest(root) if local else _read_remote_manifest(fs, root, shown)
    check_partition(manifest, shown, size, split)
    folder = f"{root}/size={int(size)}/split={split}"
    units = _list_units(fs, folder)
    expected = int(manifest["rows"][str(int(size))][split])
    found = sum(u.n_rows for u in units)
    if found != expected:
        raise CxrflowError(
            f"size {size} split {split!r} holds {found} rows in its Parquet files but the manifest says {expected}; "
            "the store is incomplete or was modified (re-run 'cxrflow etl')",
            folder,
        )
    plan = _Plan(filesystem=fs, units=tuple(units), size=int(size), num_labels=len(manifest["label_names"]))
    return StoreLoader(
        plan, manifest, split=split, batch_size=int(batch_size), shuffle=bool(shuffle), seed=int(seed),
        epoch=int(epoch), num_workers=int(num_workers), rank=int(rank), world_size=int(world_size),
        drop_last=bool(drop_last), shuffle_buffer=int(shuffle_buffer),
        pin_memory=torch.cuda.is_available() if pin_memory is None else bool(pin_memory),
    )


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
        raise ValueError(f"out must be float32 {(n, channels, h, w)} on {image.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
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
