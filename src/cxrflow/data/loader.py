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

Batches are dicts (see :func:`make_loader`). Images stay uint8 until :func:`to_model_input`, which
runs on the batch's device, so on a GPU the host-to-device copy is 4x smaller than float32.
:func:`augment` is the optional train-time geometric transform, also on the batch's device.
"""

from __future__ import annotations

import collections
import math
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cxrflow.data.demographics import encode_arrow as encode_demographics
from cxrflow.errors import CxrflowError
from cxrflow.safeio import JSON_BYTES, check_size
from cxrflow.data.store import FORMAT_VERSION, KNOWN_COLUMN, MANIFEST_NAME, check_partition, read_manifest
from cxrflow.data.uncertain import apply_policy, resolve_policy

#: Columns the loader reads; the others (follow_up, original size) are never decoded.
COLUMNS = ["image_id", "patient_id", "labels", "age", "sex", "view", "pixels"]

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
    #: the store has label states (``labels_known``), and the policy for uncertain labels
    has_states: bool = False
    uncertain: str | tuple[str, ...] = "ignore"


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
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise CxrflowError(f"not a complete cxrflow store: {MANIFEST_NAME} is missing", shown)
    if info.type != pafs.FileType.File:  # a pipe would block the read, a folder fail it
        raise CxrflowError("is not a regular file (a folder, named pipe or device); expected a store manifest", path)
    check_size(info.size or 0, JSON_BYTES, f"{shown}/{MANIFEST_NAME}", "store manifest")
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
    known: np.ndarray  # uint8 [n, K]: 1 where the label counts (see cxrflow.data.uncertain)
    image_id: np.ndarray  # object array of str

    def __len__(self) -> int:
        return len(self.image_id)

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.image, self.labels, self.patient_id, self.demographics, self.known, self.image_id


def _offsets(array: pa.Array, n: int) -> np.ndarray:
    """Value offsets of a binary or list array as int64, honouring the array's slice offset."""
    wide = pa.types.is_large_binary(array.type) or pa.types.is_large_list(array.type)
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64 if wide else np.int32)
    return offsets[array.offset : array.offset + n + 1].astype(np.int64)


def _decode(batch: pa.RecordBatch, size: int, num_labels: int, path: str, first_row: int,
            uncertain: str | tuple[str, ...] = "ignore") -> _Rows:
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
    wrong = np.flatnonzero((label_values > 1).any(axis=1))  # uint8: a value is 0 or 1, or the file is damaged
    if len(wrong):
        row = int(wrong[0])
        raise bad(row, f"label values must be 0 or 1, got {sorted(set(label_values[row].tolist()))}")
    states = None
    if KNOWN_COLUMN in batch.schema.names:
        states = batch.column(KNOWN_COLUMN).flatten().to_numpy(zero_copy_only=False).reshape(n, num_labels)
    label_values, known = apply_policy(label_values, states, uncertain)

    demographics = encode_demographics(batch.column("age"), batch.column("sex"), batch.column("view"))
    return _Rows(
        image=image,
        labels=label_values,
        patient_id=batch.column("patient_id").to_numpy(zero_copy_only=False),
        demographics=demographics,
        known=known,
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
                columns = COLUMNS + [KNOWN_COLUMN] if plan.has_states else COLUMNS
                table = parquet.read_row_group(unit.row_group, columns=columns, use_threads=use_threads)
            except (pa.ArrowException, OSError) as exc:
                raise CxrflowError(f"corrupt Parquet file (row group {unit.row_group}): {exc}", unit.path) from None
            if table.num_rows != unit.n_rows:
                raise CxrflowError(f"row group {unit.row_group} changed since the loader was made", unit.path)
            table = table.slice(lo, hi - lo)
            first_row = sum(parquet.metadata.row_group(g).num_rows for g in range(unit.row_group)) + lo
            for record_batch in table.to_batches():
                if record_batch.num_rows:
                    yield _decode(record_batch, plan.size, plan.num_labels, unit.path, first_row, plan.uncertain)
                    first_row += record_batch.num_rows
    finally:
        if open_file is not None:
            open_file.close()


# --------------------------------------------------------------------------------------------
# Output memory
#
# A 512-px batch of 32 is 8 MiB. Fresh memory for every batch costs a page fault per 4 KiB on first
# write (and, from a DataLoader worker, a new shared-memory file whose pages fault in both
# processes): more than the copy itself. So each batch's four tensors live in one packed buffer,
# and the buffers are reused once the consumer has dropped every tensor of the batch.

#: Buffers kept for reuse per process: the batches queued by the DataLoader plus those the consumer
#: still holds. When all are in use, a batch gets fresh memory (never waits, never overwrites).
_POOL_SLOTS = 6

#: Row groups read ahead by the background reading thread.
_READ_AHEAD = 2

_FIELDS = ("image", "labels", "patient_id", "demographics", "known")


def _layout(n: int, size: int, num_labels: int) -> tuple[list[tuple[str, int, tuple[int, ...], torch.dtype]], int]:
    """Where each tensor of an ``n``-row batch lies in its packed uint8 buffer (64-byte aligned), and its bytes."""
    specs = (("image", (n, 1, size, size), torch.uint8), ("labels", (n, num_labels), torch.float32),
             ("patient_id", (n,), torch.int64), ("demographics", (n, 3), torch.float32),
             ("known", (n, num_labels), torch.float32))
    out, offset = [], 0
    for name, shape, dtype in specs:
        out.append((name, offset, shape, dtype))
        offset += -(-math.prod(shape) * dtype.itemsize // 64) * 64
    return out, offset


def _unpack(packed: torch.Tensor, n: int, size: int, num_labels: int) -> dict[str, torch.Tensor]:
    """The batch tensors as views of one packed uint8 buffer (see :func:`_layout`)."""
    fields, _ = _layout(n, size, num_labels)
    return {
        name: packed[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for name, offset, shape, dtype in fields
    }


def _new_shared(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor in shared memory, so that handing it from a DataLoader
    worker to the main process costs no copy (the same trick as torch's default_collate)."""
    proto = torch.empty(0, dtype=torch.uint8)
    return proto.new(proto._typed_storage()._new_shared(nbytes, device="cpu"))


class _LocalSlots:
    """Reusable output buffers in this process. A buffer is free again when nothing but the pool
    refers to it: batch tensors are made with ``torch.from_numpy``, which holds the array."""

    def __init__(self) -> None:
        self.slots: list[np.ndarray] = []
        self.free_refs = 0

    def take(self, nbytes: int, capacity: int) -> tuple[torch.Tensor, int]:
        for k in range(len(self.slots)):
            if len(self.slots[k]) >= nbytes and _refs(self.slots, k) == self.free_refs:
                return torch.from_numpy(self.slots[k][:nbytes]), k
        if len(self.slots) < _POOL_SLOTS:
            self.slots.append(np.empty(max(nbytes, capacity), dtype=np.uint8))
            self.free_refs = _refs(self.slots, len(self.slots) - 1)
            return torch.from_numpy(self.slots[-1][:nbytes]), len(self.slots) - 1
        return torch.empty(nbytes, dtype=torch.uint8), -1


def _refs(slots: list[np.ndarray], k: int) -> int:
    return sys.getrefcount(slots[k])


class _SharedSlots:
    """Reusable shared-memory output buffers of one DataLoader worker. ``busy`` (shared with the
    main process, one flag per buffer) is set here when a buffer is filled and cleared by the main
    process once the consumer has dropped the batch (see :meth:`StoreLoader.__iter__`)."""

    def __init__(self, busy: np.ndarray):
        self.busy = busy
        self.slots: list[torch.Tensor] = []

    def take(self, nbytes: int, capacity: int) -> tuple[torch.Tensor, int]:
        for k, slot in enumerate(self.slots):
            if not self.busy[k] and len(slot) >= nbytes:
                self.busy[k] = 1
                return slot[:nbytes], k
        if len(self.slots) < len(self.busy):
            self.slots.append(_new_shared(max(nbytes, capacity)))
            self.busy[len(self.slots) - 1] = 1
            return self.slots[-1][:nbytes], len(self.slots) - 1
        return _new_shared(nbytes), -1


class _OneOff:
    """Fresh output memory for every batch (shared memory inside a worker of a caller's own DataLoader)."""

    def __init__(self, shared: bool):
        self.shared = shared

    def take(self, nbytes: int, capacity: int) -> tuple[torch.Tensor, int]:
        return (_new_shared(nbytes) if self.shared else torch.empty(nbytes, dtype=torch.uint8)), -1


# --------------------------------------------------------------------------------------------
# Shuffling and batching


class _Window:
    """Decoded blocks laid end to end (zero-copy views over their Arrow buffers), indexed as one."""

    def __init__(self, blocks: list[_Rows]):
        self.blocks = blocks
        self.starts = np.cumsum([0] + [len(b) for b in blocks])

    def segments(self, index: np.ndarray) -> Iterator[tuple[slice, _Rows, np.ndarray]]:
        """For ascending window rows ``index``: (positions in ``index``, block, rows in that block)."""
        cuts = np.searchsorted(index, self.starts)
        for b, block in enumerate(self.blocks):
            lo, hi = int(cuts[b]), int(cuts[b + 1])
            if hi > lo:
                yield slice(lo, hi), block, index[lo:hi] - self.starts[b]

    def gather(self, index: np.ndarray, packed: torch.Tensor, size: int, num_labels: int) -> dict[str, Any]:
        """Rows ``index`` (ascending) copied once, straight from the blocks into the packed buffer."""
        n = len(index)
        tensors = _unpack(packed, n, size, num_labels)
        outs = [tensors[name].numpy().reshape(n, -1) for name in _FIELDS] + [np.empty(n, dtype=object)]
        for at, block, rows in self.segments(index):
            for out, src in zip(outs, block.arrays()):
                if out.dtype == object or src.dtype != out.dtype:
                    out[at] = src[rows].reshape(len(rows), *out.shape[1:])
                else:
                    np.take(src.reshape(len(src), -1), rows, axis=0, out=out[at])
        return {**tensors, "image_id": outs[-1].tolist()}

    def copy(self, index: np.ndarray) -> _Rows:
        """The rows ``index`` (ascending) as a new, small block that owns its memory."""
        parts = [[a[rows] for a in block.arrays()] for _, block, rows in self.segments(index)]
        return _Rows(*(np.concatenate(columns) for columns in zip(*parts)))


def _window_batches(blocks: Iterator[_Rows], batch_size: int, total: int, window: int, size: int, num_labels: int,
                    rng: np.random.Generator | None, slots: Any) -> Iterator[tuple[dict[str, Any], torch.Tensor, int]]:
    """``total`` rows in batches of ``batch_size`` (only the very last may be short), with each
    batch's packed buffer and its slot number (-1: not pooled).

    Blocks are gathered into a window of at least ``window`` rows (whole row groups, never copied);
    with ``rng`` the window's rows are permuted, otherwise they keep stream order. Each batch is
    copied straight from the window's blocks into its output buffer; the fewer than ``batch_size``
    rows left over are copied into a small block that opens the next window, so the window's row
    groups are released as soon as it is used up. Memory: about ``window`` rows plus a row group or two.
    """
    window = max(window, batch_size)
    # no batch holds more than the ``total`` rows there are: a --batch-size beyond the split is one batch,
    # not a buffer sized for rows that do not exist
    capacity = _layout(min(batch_size, max(total, 1)), size, num_labels)[1]
    carry: list[_Rows] = []
    remaining = total
    stream = iter(blocks)
    done = False
    while not done:
        parts, n = carry, sum(len(c) for c in carry)
        while n < window:
            block = next(stream, None)
            if block is None:
                done = True
                break
            parts.append(block)
            n += len(block)
        if n == 0:
            break
        view = _Window(parts)
        order = rng.permutation(n) if rng is not None else np.arange(n)
        full = n if done else n - n % batch_size
        for start in range(0, full, batch_size):
            index = order[start : start + batch_size]
            if rng is not None:
                index = np.sort(index)  # the batch's rows are random; reading them in window order is faster
            packed, slot = slots.take(_layout(len(index), size, num_labels)[1], capacity)
            remaining -= len(index)
            yield view.gather(index, packed, size, num_labels), packed, slot
        carry = [view.copy(np.sort(order[full:]))] if full < n else []
        del view, parts, block
    if remaining:
        raise AssertionError(f"stream ended {remaining} rows short")


def _read_ahead(blocks: Iterator[_Rows], rows: int) -> Iterator[_Rows]:
    """``blocks``, read by a background thread up to about ``rows`` rows ahead of the consumer.

    pyarrow's reading and decompression and numpy's copies release the GIL, so the next window is
    read while the current one is cut into batches. Errors are re-raised in the consumer; closing
    the iterator stops the thread.
    """
    cond = threading.Condition()
    ready: collections.deque = collections.deque()
    state = {"rows": 0, "end": False, "error": None, "stop": False}

    def run() -> None:
        try:
            for block in blocks:
                with cond:
                    cond.wait_for(lambda: state["stop"] or state["rows"] < rows)
                    if state["stop"]:
                        return
                    ready.append(block)
                    state["rows"] += len(block)
                    cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
            with cond:
                state["error"] = exc
        finally:
            blocks.close()
            with cond:
                state["end"] = True
                cond.notify_all()

    thread = threading.Thread(target=run, name="cxrflow-loader-read", daemon=True)
    thread.start()
    try:
        while True:
            with cond:
                cond.wait_for(lambda: ready or state["end"])
                if not ready:
                    if state["error"] is not None:
                        raise state["error"]
                    return
                block = ready.popleft()
                state["rows"] -= len(block)
                cond.notify_all()
            yield block
            del block
    finally:
        with cond:
            state["stop"] = True
            ready.clear()
            cond.notify_all()
        thread.join()


# --------------------------------------------------------------------------------------------
# The dataset each DataLoader worker runs, and the loader object


class _StoreStream(IterableDataset):
    """One rank's share of one epoch; each DataLoader worker takes its own block of batches.

    With ``busy`` (set by :class:`StoreLoader`, one row of flags per worker in shared memory) the
    workers reuse their output buffers and send each batch packed; the main process unpacks it.
    """

    def __init__(self, plan: _Plan, *, batch_size: int, shuffle: bool, seed: int, epoch: int, rank: int,
                 world_size: int, drop_last: bool, shuffle_buffer: int, busy: torch.Tensor | None = None):
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
            slots: Any = _LocalSlots()
        elif self.busy is not None:
            slots = _SharedSlots(self.busy[worker].numpy())
        else:
            slots = _OneOff(shared=True)
        try:
            for batch, packed, slot in self._batches(worker, workers, in_worker=info is not None, slots=slots):
                if info is not None and self.busy is not None:
                    yield {_PACKED_KEY: packed, _SLOT_KEY: (worker, slot, len(batch["image_id"])),
                           "image_id": batch["image_id"]}
                else:
                    yield batch
        except CxrflowError as exc:
            if info is None:
                raise
            # Travels to the main process as data, so the user sees one clean line, not a worker traceback.
            yield {_ERROR_KEY: (exc.message, exc.path, exc.line)}

    def _batches(self, worker: int, workers: int, in_worker: bool,
                 slots: Any) -> Iterator[tuple[dict[str, Any], torch.Tensor, int]]:
        units = _epoch_units(self.plan.units, self.shuffle, self.seed, self.epoch)
        total = sum(u.n_rows for u in units)
        rank_lo, rank_hi = _rank_range(total, self.rank, self.world_size, self.drop_last)
        lo, hi = _worker_range(rank_hi - rank_lo, self.batch_size, self.drop_last, worker, workers)
        if hi <= lo:
            return
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 1])
            window = min(-(-self.shuffle_buffer // workers), hi - lo)  # the rank's buffer, shared by its workers
        else:
            rng, window = None, self.batch_size
        blocks = _read_rows(self.plan, units, rank_lo + lo, rank_lo + hi, use_threads=not in_worker)
        if not in_worker:  # read the next window while this one is batched (workers overlap with each other)
            blocks = _read_ahead(blocks, max(window, self.batch_size))
        yield from _window_batches(blocks, self.batch_size, hi - lo, window, self.plan.size, self.plan.num_labels,
                                   rng=rng, slots=slots)


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
        return self._dataset(None)

    def _dataset(self, busy: torch.Tensor | None) -> _StoreStream:
        return _StoreStream(
            self.plan, batch_size=self.batch_size, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
            rank=self.rank, world_size=self.world_size, drop_last=self.drop_last,
            shuffle_buffer=self.shuffle_buffer, busy=busy,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Workers' reusable output buffers: a flag per buffer, set by the worker that fills it and
        # cleared here once no tensor of that batch is left (or once it was copied to pinned memory).
        if self.num_workers == 0 and not self.pin_memory:  # DataLoader would only add per-batch overhead
            yield from self._dataset(None)
            return
        busy = None
        if self.num_workers:
            busy = torch.zeros((self.num_workers, _POOL_SLOTS), dtype=torch.int8).share_memory_()
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
            batch = {**_unpack(packed, n, self.size, len(self.label_names)), "image_id": item["image_id"]}
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
    if shuffle_buffer is None and isinstance(size, (int, np.integer)) and size > 0:
        shuffle_buffer = default_shuffle_buffer(size, batch_size if isinstance(batch_size, int) else 1)
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
    plan = _Plan(filesystem=fs, units=tuple(units), size=int(size), num_labels=len(manifest["label_names"]),
                 has_states="uncertain_policies" in manifest,
                 uncertain=resolve_policy(uncertain, manifest["label_names"]))
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
