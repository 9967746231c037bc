"""Spark ETL: a release folder of raw chest X-rays to one multi-resolution Parquet store.

One Spark job reads every image once (the executors read the files; the driver only ships
metadata), decodes it with :mod:`cxrflow.data.imaging`, resizes it to every requested size and writes
``STORE/size=<S>/split=<split>/part-NNNNN.parquet`` with the exact :data:`cxrflow.data.store.SCHEMA`.
Each split's rows are in a seeded pseudo-random order (sorted by :func:`cxrflow.data.store.row_order_key`
of the seed and image_id, planned on the driver from the metadata alone; recorded in the manifest as
``row_order``), so a patient's follow-ups are spread over the split and a loader's window of
consecutive rows is a uniform sample of it. Each task owns one contiguous slice of that order in
one split and writes one file per size
(written under a hidden name, then renamed), so the store's files and rows depend only on the
inputs and the seed, never on the master or the number of executors, and a retried task rewrites
the same file. Tasks return small summaries only (counts, quarantined images with their reason,
label sums, a 256-bin pixel histogram per size), which give the manifest's pixel mean/std and
``pos_weight`` without moving a pixel to the driver (:mod:`cxrflow.data.etlsummary` makes the
manifest from them).

Everything is written under a hidden temporary sibling of the destination; the manifest is written
last, after the store was checked with pyarrow, and only then is the folder renamed into place. A
killed or failed run therefore never leaves a folder at the destination. The destination's lock
(:mod:`cxrflow.outputs`) is taken before any metadata is read, so a second ETL on the same output
stops at once with one line naming the holder.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from cxrflow.atomic import write_json_atomic
from cxrflow.data.etlmanifest import complete_manifest
from cxrflow.data.etlsummary import Progress, build_manifest
from cxrflow.data.formats import Collection
from cxrflow.data.formats.dicom import spacing_row
from cxrflow.data.imaging import MAX_STORE_SIZE, ImageError, load_and_resize
from cxrflow.data.store import (
    KNOWN_COLUMN,
    MANIFEST_NAME,
    SPLITS,
    row_group_rows,
    row_order_key,
    schema_for,
    split_dir,
)
from cxrflow.errors import CxrflowError
from cxrflow.outputs import publishing

#: Target uncompressed bytes of one file at the largest size (caps images per task and file).
FILE_TARGET_BYTES = 128 * 2**20
#: Automatic layout: about this many tasks for the whole release, but never fewer than
#: MIN_ROWS_PER_FILE images per task (a task costs ~0.03-0.1 s of scheduling on top of its images).
TARGET_TASKS = 64
MIN_ROWS_PER_FILE = 32
COMPRESSIONS = ("zstd", "snappy", "lz4", "gzip", "none")
MAX_SIZE = MAX_STORE_SIZE
#: Threads per task that decode and resize (see :func:`process_task`).
DECODE_THREADS = 2


# ------------------------------------------------------------------------------------------ planning


def parse_sizes(text: str | Iterable[int]) -> list[int]:
    """``"256,512"`` (or a list of ints) to sorted unique sizes; CxrflowError when malformed."""
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    sizes = []
    for part in parts:
        try:
            size = int(part)
        except (TypeError, ValueError):
            raise CxrflowError(f"--sizes must be comma-separated integers like 256,512, got {text!r}") from None
        if not 1 <= size <= MAX_SIZE:
            raise CxrflowError(f"--sizes: every size must be between 1 and {MAX_SIZE} pixels, got {size}")
        sizes.append(size)
    if not sizes:
        raise CxrflowError("--sizes is empty; give at least one size, e.g. 256")
    return sorted(set(sizes))


def auto_rows_per_file(n_images: int, max_size: int) -> int:
    """Images per task and file for a run of ``n_images``: about TARGET_TASKS tasks, at least
    MIN_ROWS_PER_FILE images each, at most ~FILE_TARGET_BYTES per file at the largest size.

    It depends on the inputs only (not on the cluster), so every master writes the same files.
    """
    cap = max(1, FILE_TARGET_BYTES // (max_size * max_size))
    return max(1, min(cap, max(MIN_ROWS_PER_FILE, math.ceil(n_images / TARGET_TASKS))))


def plan_tasks(records: Sequence[dict], rows_per_file: int, seed: int = 0) -> list[tuple[str, int, list[dict]]]:
    """Group image records into tasks ``(split, part number, records)``: each split in the seeded
    pseudo-random row order of :func:`cxrflow.data.store.row_order_key`, cut into contiguous slices of
    ``rows_per_file``, so the layout depends on the inputs and the seed only."""
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for rec in records:
        by_split[rec["split"]].append(rec)
    tasks = []
    for split in SPLITS:
        recs = sorted(by_split[split], key=lambda r: (row_order_key(seed, r["image_id"]), r["image_id"]))
        for part, start in enumerate(range(0, len(recs), rows_per_file)):
            tasks.append((split, part, recs[start : start + rows_per_file]))
    return tasks


# ------------------------------------------------------------------------------- executor-side work


def _binary(images: list[np.ndarray]) -> pa.Array:
    """``images`` (uint8 arrays) as one Arrow binary array: one copy into a contiguous buffer."""
    data = np.concatenate([img.reshape(-1) for img in images]) if images else np.zeros(0, np.uint8)
    offsets = np.zeros(len(images) + 1, dtype=np.int32)
    np.cumsum([img.size for img in images], out=offsets[1:])
    return pa.Array.from_buffers(pa.binary(), len(images), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _table(rows: list[dict], pixels: list[np.ndarray]) -> pa.Table:
    """One Arrow table in the store's exact schema (every column cast explicitly)."""
    columns = {
        "image_id": pa.array([r["image_id"] for r in rows], pa.string()),
        "patient_id": pa.array([r["patient_id"] for r in rows], pa.int64()),
        "labels": pa.array([list(r["labels"]) for r in rows], pa.list_(pa.uint8())),
        "age": pa.array([r["age"] for r in rows], pa.int16()),
        "sex": pa.array([r["sex"] for r in rows], pa.string()),
        "view": pa.array([r["view"] for r in rows], pa.string()),
        "follow_up": pa.array([r["follow_up"] for r in rows], pa.int32()),
        "orig_width": pa.array([r["orig_width"] for r in rows], pa.int32()),
        "orig_height": pa.array([r["orig_height"] for r in rows], pa.int32()),
        "pixels": _binary(pixels),
    }
    known = bool(rows) and "known" in rows[0]
    if known:
        columns[KNOWN_COLUMN] = pa.array([list(r["known"]) for r in rows], pa.list_(pa.uint8()))
    schema = schema_for(known)
    return pa.table({name: columns[name] for name in schema.names}, schema=schema)


class _PartWriter:
    """Streams one (size, split, part) file: fixed-size row groups, hidden name until closed."""

    def __init__(
        self, store: str, size: int, split: str, part: int, group_rows: int, compression: str, known: bool = False
    ):
        self.schema = schema_for(known)
        self.folder = split_dir(store, size, split)
        self.final = self.folder / f"part-{part:05d}.parquet"
        self.tmp = self.folder / f".part-{part:05d}.{uuid.uuid4().hex}.tmp"
        self.group_rows = group_rows
        self.compression = None if compression == "none" else compression
        self.rows: list[dict] = []
        self.pixels: list[np.ndarray] = []
        self.writer: pq.ParquetWriter | None = None

    def add(self, row: dict, pixels: np.ndarray) -> None:
        self.rows.append(row)
        self.pixels.append(pixels)
        if len(self.rows) >= self.group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        if self.writer is None:
            # the store's own folder is the driver's (its partial folder): a task makes only the partition
            # folders inside it, so a task that outlives its job (a lost executor's Python worker, a killed
            # driver's) fails here instead of re-creating a folder the driver has removed or published
            self.folder.parent.mkdir(exist_ok=True)
            self.folder.mkdir(exist_ok=True)
            self.writer = pq.ParquetWriter(
                str(self.tmp),
                self.schema,
                compression=self.compression,
                use_dictionary=[n for n in self.schema.names if n != "pixels"],
                write_statistics=[n for n in self.schema.names if n != "pixels"],
            )
        self.writer.write_table(_table(self.rows, self.pixels), row_group_size=self.group_rows)
        self.rows, self.pixels = [], []

    def close(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            os.replace(self.tmp, self.final)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.tmp.exists():
            self.tmp.unlink()


class _Prepared(NamedTuple):
    """One image after a worker thread decoded and resized it (or found it undecodable)."""

    record: dict
    width: int = 0
    height: int = 0
    pixels: dict[int, np.ndarray] | None = None
    histograms: dict[int, list[int]] | None = None  # train images only
    error: str | None = None
    seconds: float = 0.0


def _prepare(rec: dict, sizes: Sequence[int], histograms: bool) -> _Prepared:
    """Decode and resize one image; with ``histograms``, also its 256-bin histogram per size."""
    t = time.perf_counter()
    try:
        resized, (width, height) = load_and_resize(rec["path"], sizes)
    except ImageError as exc:
        return _Prepared(rec, error=exc.message, seconds=time.perf_counter() - t)
    hists = None
    if histograms:  # Pillow's histogram: C, no copy of the pixels, GIL released
        hists = {s: Image.fromarray(img).histogram() for s, img in resized.items()}
    return _Prepared(rec, width, height, resized, hists, None, time.perf_counter() - t)


def _in_order(pool: ThreadPoolExecutor, fn, items: Iterable, ahead: int) -> Iterator:
    """``fn`` over ``items`` on ``pool``: results in input order, at most ``ahead`` in flight."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def process_task(
    task: tuple[str, int, list[dict]],
    *,
    store: str,
    sizes: Sequence[int],
    group_rows: dict[int, int],
    compression: str,
    num_labels: int,
    threads: int = DECODE_THREADS,
) -> dict:
    """Decode, resize and write one task's images; return its summary (no pixels).

    Runs on an executor. ``threads`` threads decode and resize while this one writes (Pillow and
    pyarrow release the GIL), so a core is not idle while its task writes or waits on storage, and
    the last tasks of a job also use the cores that have no task left. Rows are written in input
    order whatever the threads do. An image that fails to decode is quarantined with its reason.
    """
    split, part, records = task
    started = time.perf_counter()
    decode_seconds = 0.0
    known = bool(records) and "known" in records[0]
    writers = {s: _PartWriter(store, s, split, part, group_rows[s], compression, known) for s in sizes}
    histograms = {s: np.zeros(256, dtype=np.int64) for s in sizes}
    positives = np.zeros(num_labels, dtype=np.int64)
    quarantined: list[dict] = []
    spacings: list[list] = []  # DICOM sources' pixel spacing
    written = 0
    prepare = functools.partial(_prepare, sizes=sizes, histograms=split == "train")
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="cxrflow-etl") as pool:
            for done in _in_order(pool, prepare, records, ahead=2 * threads):
                rec = done.record
                decode_seconds += done.seconds
                if done.error is not None:
                    quarantined.append({"image_id": rec["image_id"], "path": rec["path"], "reason": done.error})
                    continue
                row = dict(rec, orig_width=done.width, orig_height=done.height)
                for s in sizes:
                    if done.histograms is not None:  # the manifest's pixel statistics are over train only
                        histograms[s] += done.histograms[s]
                    writers[s].add(row, done.pixels[s])
                positives += np.frombuffer(rec["labels"], dtype=np.uint8)
                written += 1
                spacing = spacing_row(rec["image_id"], rec["path"])
                if spacing is not None:
                    spacings.append(spacing)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return {
        "split": split,
        "part": part,
        "images": len(records),
        "written": written,
        "quarantined": quarantined,
        "pixel_spacing": spacings,
        "positives": positives.tolist(),
        "histograms": {s: h.tolist() for s, h in histograms.items()},
        "seconds": time.perf_counter() - started,
        "decode_seconds": decode_seconds,
    }


def _run_partition(tasks: Iterator[tuple[str, int, list[dict]]], counter, **kwargs) -> Iterator[dict]:
    # A reused PySpark worker runs a full gc.collect() after every task; over the ~50,000 objects
    # of the imported modules (numpy, pyarrow, Pillow) that is ~15 ms a task. Freezing what exists
    # now (modules, not garbage: the last task's collect just ran) takes them out of every later scan.
    gc.freeze()
    for task in tasks:
        summary = process_task(task, **kwargs)
        counter.add(summary["images"])
        yield summary


# ------------------------------------------------------------------------------------- driver side


#: What a worker's disk or permission failure reads like inside Spark's exception text.
_ENVIRONMENT_FAILURES = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied")


def _environment_failure(exc: Exception, out: Path) -> CxrflowError | None:
    """A CxrflowError when a Spark job failed because a worker could not write (full disk, read-only
    or forbidden folder), else None: Spark passes the worker's OSError on only as text."""
    text = str(exc)
    found = next((f for f in _ENVIRONMENT_FAILURES if f in text), None)
    if found is None:
        return None
    fix = (
        "write somewhere you may write"
        if found in ("Read-only file system", "Permission denied")
        else "free some space"
    )
    return CxrflowError(
        f"a Spark task could not write the store: {found}; {fix} and run again (nothing was published)", out
    )


def _check_etl_args(
    sizes, compression, threads, rows_per_file, val_fraction, spark, master, driver_memory, executor_memory
) -> tuple[list[int], str]:
    """:func:`run_etl`'s options checked before anything is read; returns the parsed sizes and the
    checked master (unchanged when an existing ``spark`` session is used)."""
    from cxrflow.data.spark import check_local_cluster, check_master, check_memory, check_reachable

    sizes = parse_sizes(sizes) if isinstance(sizes, str) else parse_sizes(list(sizes))
    if compression not in COMPRESSIONS:
        raise CxrflowError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")
    if threads < 1:
        raise CxrflowError(f"--threads must be at least 1, got {threads}")
    if rows_per_file is not None and rows_per_file < 1:
        raise CxrflowError(f"--rows-per-file must be at least 1, got {rows_per_file}")
    if not 0.0 < val_fraction < 1.0:  # validation picks the best epoch: it cannot be empty
        raise CxrflowError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if spark is None:
        master = check_master(master)
        check_memory(driver_memory, "--driver-memory")
        check_local_cluster(master, check_memory(executor_memory, "--executor-memory"))
        check_reachable(master)
    return sizes, master


def run_etl(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    sizes: Iterable[int] | str = (256, 512),
    master: str = "local[*]",
    *,
    val_fraction: float = 0.3,
    seed: int = 0,
    overwrite: bool = False,
    strict: bool = False,
    verbose: bool = False,
    rows_per_file: int | None = None,
    compression: str = "zstd",
    threads: int = DECODE_THREADS,
    driver_memory: str | None = None,
    executor_memory: str | None = None,
    format: str = "auto",
    views: str = "frontal",
    spark: Any = None,
    progress: TextIO | None = None,
    split_csv: str | os.PathLike | None = None,
) -> dict:
    """Run the ETL and return the manifest (also written to ``out/build_manifest.json``).

    ``spark``: an existing SparkSession to use (then ``master`` and the memory options are not
    used and the session is left running); by default one is started on ``master`` and stopped.
    ``progress``: a stream for the progress display (None: no display). ``strict``: a missing or
    undecodable image is an error instead of being reported. ``format``: the collection's reader
    (:mod:`cxrflow.data.formats`; ``auto`` detects it), ``views``: ``frontal`` or ``all``. ``split_csv``: a
    file written by ``cxrflow split`` whose assignment is used exactly (then ``val_fraction`` does not
    apply and ``seed`` only sets the row order); without it the split is the collection's, the same
    as ``cxrflow split`` computes with the same options.
    """
    from cxrflow.data.formats import load_collection
    from cxrflow.data.split import assign_collection_splits, read_split_csv

    started = time.perf_counter()
    sizes, master = _check_etl_args(
        sizes, compression, threads, rows_per_file, val_fraction, spark, master, driver_memory, executor_memory
    )
    out = Path(out).absolute()
    # the output's lock comes first: a second ETL on the same output stops before reading any metadata
    with publishing(out, "etl", overwrite=overwrite, inputs=[data_dir]) as pub:
        release = load_collection(data_dir, format, views=views, strict=strict)
        if split_csv is not None:
            splits = read_split_csv(split_csv, release.entries)
        else:
            splits = assign_collection_splits(release, val_fraction, seed)
        records = image_records(release, splits)
        per_file = rows_per_file or auto_rows_per_file(len(records), max(sizes))
        tasks = plan_tasks(records, per_file, seed)
        group_rows = {s: row_group_rows(s, per_file) for s in sizes}
        return _write_store(
            pub,
            release,
            splits,
            tasks,
            records,
            sizes,
            master,
            spark,
            group_rows,
            per_file,
            vocab=release.vocab,
            strict=strict,
            verbose=verbose,
            val_fraction=val_fraction,
            seed=seed,
            compression=compression,
            threads=threads,
            driver_memory=driver_memory,
            executor_memory=executor_memory,
            progress=progress,
            started=started,
        )


def image_records(release: Collection, splits: pd.DataFrame) -> list[dict]:
    """One record per image of the collection that has a file: what a Spark task needs to write its
    row (path, split, patient, labels as bytes, demographics; label states where the format has them)."""
    vocab, states, entries = release.vocab, release.states, release.entries
    label_matrix = entries[list(vocab.names)].to_numpy(dtype=np.uint8)
    split_of = dict(zip(splits["image_id"], splits["split"]))
    records = []
    for i, row in enumerate(
        entries[["image_id", "patient_id", "age", "sex", "view", "follow_up"]].itertuples(index=False)
    ):
        path = release.images.get(row.image_id)
        if path is None:
            continue
        records.append(
            {
                "image_id": row.image_id,
                "path": str(Path(path).absolute()),
                "split": split_of[row.image_id],
                "patient_id": int(row.patient_id),
                "labels": label_matrix[i].tobytes(),
                "age": int(row.age),
                "sex": row.sex,
                "view": row.view,
                "follow_up": int(row.follow_up),
                **({} if states is None else {"known": states[i].tobytes()}),
            }
        )
    return records


def _write_store(
    pub,
    release,
    splits,
    tasks,
    records,
    sizes,
    master,
    spark,
    group_rows,
    per_file,
    *,
    vocab,
    strict,
    verbose,
    val_fraction,
    seed,
    compression,
    threads,
    driver_memory,
    executor_memory,
    progress,
    started,
):
    """Run the Spark job into ``pub.tmp``, check the store, write its manifest and publish it."""
    summaries, job_seconds, used_master = _run_spark_job(
        pub,
        tasks,
        records,
        sizes,
        master,
        spark,
        group_rows,
        num_labels=len(vocab),
        verbose=verbose,
        compression=compression,
        threads=threads,
        driver_memory=driver_memory,
        executor_memory=executor_memory,
        progress=progress,
    )
    manifest = build_manifest(
        release,
        splits,
        summaries,
        sizes,
        vocab,
        used_master,
        val_fraction,
        seed,
        compression,
        group_rows,
        per_file,
        job_seconds,
    )
    complete_manifest(manifest, pub.tmp, release, records, summaries, sizes, strict)
    manifest["wall_seconds"] = round(time.perf_counter() - started, 3)
    write_json_atomic(pub.tmp / MANIFEST_NAME, manifest)
    pub.commit()
    return manifest


def _run_spark_job(
    pub,
    tasks,
    records,
    sizes,
    master,
    spark,
    group_rows,
    *,
    num_labels,
    verbose,
    compression,
    threads,
    driver_memory,
    executor_memory,
    progress,
) -> tuple[list[dict], float, str]:
    """Write the tasks' files into ``pub.tmp`` with one Spark job (on ``spark``, or on a session
    started on ``master`` and stopped after); returns the tasks' summaries, the job's seconds and
    the master it ran on."""
    from cxrflow.data.spark import spark_session

    own_spark = spark is None
    with contextlib.ExitStack() as stack:
        if own_spark:  # stopped at the end, its JVM ended, however the job ends (Ctrl-C included)
            spark = stack.enter_context(
                spark_session(
                    master, "cxrflow etl", driver_memory=driver_memory, executor_memory=executor_memory, verbose=verbose
                )
            )
        sc = spark.sparkContext
        job_started = time.perf_counter()
        summaries: list[dict] = []
        if tasks:
            counter = sc.accumulator(0)
            work = functools.partial(
                _run_partition,
                counter=counter,
                store=str(pub.tmp),
                sizes=sizes,
                group_rows=group_rows,
                compression=compression,
                num_labels=num_labels,
                threads=threads,
            )
            sc.setJobDescription(f"cxrflow etl: {len(records)} images to sizes {sizes}")
            rdd = sc.parallelize(tasks, len(tasks)).mapPartitions(work)
            try:
                if progress is not None:
                    with Progress(counter, len(records), progress):
                        summaries = rdd.collect()
                else:
                    summaries = rdd.collect()
            except Exception as exc:
                raise (_environment_failure(exc, pub.out) or exc) from None
        job_seconds = time.perf_counter() - job_started
    return summaries, job_seconds, master if own_spark else spark.sparkContext.master
