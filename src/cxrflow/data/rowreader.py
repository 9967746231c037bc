"""Reading a store partition's rows for :mod:`cxrflow.data.loader`: where the store lives (local
path, URL or a given filesystem), its row groups (the *units*, listed once from the Parquet
footers), which rows each rank and DataLoader worker reads in an epoch, and decoding a row group's
columns to numpy without per-row Python work.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cxrflow.data.demographics import encode_arrow as encode_demographics
from cxrflow.data.store import FORMAT_VERSION, KNOWN_COLUMN, MANIFEST_NAME, schema_problems
from cxrflow.data.uncertain import apply_policy
from cxrflow.errors import CxrflowError
from cxrflow.safeio import JSON_BYTES, check_size

#: Columns the loader reads; the others (follow_up, original size) are never decoded.
COLUMNS = ["image_id", "patient_id", "labels", "age", "sex", "view", "pixels"]


# --------------------------------------------------------------------------------------------
# Where the store lives


@dataclass(frozen=True)
class Unit:
    """One row group of one Parquet file: the smallest piece the loader reads."""

    path: str
    row_group: int
    n_rows: int


@dataclass(frozen=True)
class Plan:
    """What every worker needs to find its rows; identical in all ranks and workers."""

    filesystem: pafs.FileSystem
    units: tuple[Unit, ...]
    size: int
    num_labels: int
    #: the store has label states (``labels_known``), and the policy for uncertain labels
    has_states: bool = False
    uncertain: str | tuple[str, ...] = "ignore"


def resolve_filesystem(store: str | os.PathLike, filesystem: Any) -> tuple[pafs.FileSystem, str, bool]:
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


def read_remote_manifest(fs: pafs.FileSystem, root: str, shown: str) -> dict:
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


def list_units(fs: pafs.FileSystem, folder: str) -> list[Unit]:
    """Every row group of the partition's Parquet files, in file-name order."""
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    paths = sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File and i.base_name.endswith(".parquet") and not i.base_name.startswith(("_", "."))
    )
    units = []
    for path in paths:
        try:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
        except (pa.ArrowException, OSError) as exc:
            raise CxrflowError(f"corrupt or unreadable Parquet file: {exc}", path) from None
        wrong = schema_problems(meta.schema.to_arrow_schema(), COLUMNS)
        if wrong:
            raise CxrflowError(f"not a cxrflow store file: columns {', '.join(wrong)}", path)
        units.extend(Unit(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups))
    return [u for u in units if u.n_rows > 0]


# --------------------------------------------------------------------------------------------
# Who reads which rows


def rank_range(total: int, rank: int, world_size: int, drop_last: bool) -> tuple[int, int]:
    """[start, stop) of this rank's rows in the epoch's row index space."""
    if drop_last:
        per_rank = total // world_size  # equal shares, so every rank yields the same number of batches
        return rank * per_rank, (rank + 1) * per_rank
    return rank * total // world_size, (rank + 1) * total // world_size


def num_batches(rows: int, batch_size: int, drop_last: bool) -> int:
    return rows // batch_size if drop_last else math.ceil(rows / batch_size)


def worker_range(rank_rows: int, batch_size: int, drop_last: bool, worker: int, num_workers: int) -> tuple[int, int]:
    """[start, stop) of one worker's rows inside its rank's slice: a block of whole batches."""
    batches = num_batches(rank_rows, batch_size, drop_last)
    used = min(rank_rows, batches * batch_size)
    first, last = worker * batches // num_workers, (worker + 1) * batches // num_workers
    return min(first * batch_size, used), min(last * batch_size, used)


def epoch_units(units: Sequence[Unit], shuffle: bool, seed: int, epoch: int) -> list[Unit]:
    if not shuffle:
        return list(units)
    order = np.random.default_rng([seed, epoch]).permutation(len(units))
    return [units[i] for i in order]


# --------------------------------------------------------------------------------------------
# Decoding


@dataclass
class Rows:
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


def _decode(
    batch: pa.RecordBatch,
    size: int,
    num_labels: int,
    path: str,
    first_row: int,
    uncertain: str | tuple[str, ...] = "ignore",
) -> Rows:
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
    return Rows(
        image=image,
        labels=label_values,
        patient_id=batch.column("patient_id").to_numpy(zero_copy_only=False),
        demographics=demographics,
        known=known,
        image_id=np.asarray(ids.to_pylist(), dtype=object),
    )


def read_rows(plan: Plan, units: Sequence[Unit], start: int, stop: int, use_threads: bool) -> Iterator[Rows]:
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
