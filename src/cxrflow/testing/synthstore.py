"""A store in the ETL's exact format, written directly with pyarrow (no Spark, no PNGs).

For tests and benchmarks of the loader and the trainer: fast to make at any size and row count,
and with a planted signal (finding ``i`` brightens cell ``i`` of a 4x4 grid) so that a correct
training path learns it and a broken one (shuffled labels, misaligned rows) cannot.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cxrflow.atomic import write_json_atomic
from cxrflow.data.labels import NIH14, LabelVocabulary
from cxrflow.data.store import MANIFEST_NAME, SCHEMA, manifest_core, row_order, row_order_key, split_dir
from cxrflow.data.store import row_group_rows as etl_row_group_rows
from cxrflow.identity import split_identity


def planted_image(labels: np.ndarray, size: int, rng: np.random.Generator, signal: float = 80.0) -> np.ndarray:
    """A noisy gray ``size`` x ``size`` uint8 image; finding i brightens grid cell i (4x4 grid) by
    ``signal`` gray levels (the noise has a standard deviation of 25)."""
    img = rng.normal(90.0, 25.0, (size, size))
    cell = size // 4
    for i in np.flatnonzero(labels):
        r, c = divmod(int(i), 4)
        img[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] += signal
    return np.clip(img, 0, 255).astype(np.uint8)


def write_synthetic_store(
    store: str | os.PathLike,
    sizes: tuple[int, ...] = (32,),
    rows: dict[str, int] | None = None,
    *,
    seed: int = 0,
    rows_per_file: int = 64,
    row_group_rows: int | None = 16,
    prevalence: float = 0.2,
    vocab: LabelVocabulary = NIH14,
    signal: float = 80.0,
    follow_ups: int = 1,
    shuffled: bool = True,
) -> dict:
    """Write a complete store (Parquet partitions plus manifest) and return its manifest.

    ``row_group_rows=None`` lays row groups out as the ETL does (about 64 MiB each).
    Every finding gets positives in every split when the split has enough rows; image ids are
    ``{split}_{n:06d}.png``; each patient has ``follow_ups`` consecutive image ids (as in the NIH
    release). Rows are in the ETL's seeded order (:func:`cxrflow.data.store.row_order_key`), or with
    ``shuffled=False`` in image_id order (the layout before stores were shuffled, for benchmarks).
    A small ``signal`` (e.g. 10) makes the findings faint, so that models stay far from a perfect AUC.
    """
    rows = rows or {"train": 64, "val": 32, "test": 32}
    store = Path(store)
    rng = np.random.default_rng(seed)
    k = len(vocab)
    manifest_rows: dict[str, dict[str, int]] = {}
    pixel_stats: dict[str, dict[str, float]] = {}
    positives = np.zeros(k, dtype=np.int64)
    next_patient = 1
    labels_by_split = {}
    ids_by_split = {split: [f"{split}_{i:06d}.png" for i in range(n)] for split, n in rows.items()}
    order_by_split = {
        split: sorted(range(len(ids)), key=lambda i: row_order_key(seed, ids[i])) if shuffled else list(range(len(ids)))
        for split, ids in ids_by_split.items()
    }
    for split, n in rows.items():
        lab = (rng.random((n, k)) < prevalence).astype(np.uint8)
        labels_by_split[split] = lab
        if split == "train":
            positives = lab.sum(axis=0).astype(np.int64)
    for size in sizes:
        manifest_rows[str(size)] = {}
        sums = [0.0, 0.0, 0]  # the train split's pixel sum, sum of squares and count (0..1 scale)
        patient = next_patient
        for split, n in rows.items():
            _write_split(
                store, size, split, ids_by_split[split], labels_by_split[split], order_by_split[split], patient=patient,
                seed=seed, follow_ups=follow_ups, signal=signal, rows_per_file=rows_per_file,
                row_group_rows=row_group_rows, sums=sums if split == "train" else None,
            )  # fmt: skip
            patient += -(-n // max(follow_ups, 1))
            manifest_rows[str(size)][split] = n
        total, total_sq, count = sums
        mean = total / max(count, 1)
        std = float(np.sqrt(max(total_sq / max(count, 1) - mean * mean, 1e-12)))
        pixel_stats[str(size)] = {"mean": float(mean), "std": std}
    manifest = {
        **manifest_core(vocab, sizes, manifest_rows, pixel_stats, positives),
        "source": {"metadata_rows": sum(rows.values()), "written": sum(rows.values()), "missing": 0, "quarantined": 0},
        "missing": [],
        "quarantined": [],
        "split": {"mode": "synthetic-store", "seed": seed},
        "synthetic": {"generator": "cxrflow.testing.synthstore"},
        "split_identity": {split: split_identity(ids_by_split[split], labels_by_split[split]) for split in rows},
    }
    if shuffled:
        manifest["row_order"] = row_order(seed)
    write_json_atomic(store / MANIFEST_NAME, manifest)
    return manifest


def _write_split(
    store: Path,
    size: int,
    split: str,
    ids: list[str],
    lab: np.ndarray,
    order: list[int],
    *,
    patient: int,
    seed: int,
    follow_ups: int,
    signal: float,
    rows_per_file: int,
    row_group_rows: int | None,
    sums: list | None,
) -> None:
    """The Parquet files of one (size, split) partition, ``rows_per_file`` rows each in ``order``."""
    out = split_dir(store, size, split)
    out.mkdir(parents=True, exist_ok=True)
    img_rng = np.random.default_rng([seed, size, sum(map(ord, split))])
    n = len(ids)
    for file_no, start in enumerate(range(0, n, rows_per_file)):
        index = np.asarray(order[start : min(n, start + rows_per_file)], dtype=np.int64)
        pq.write_table(
            _part_table(index, ids, lab, patient, follow_ups, size, img_rng, signal, sums),
            out / f"part-{file_no:05d}.parquet",
            row_group_size=row_group_rows or etl_row_group_rows(size, rows_per_file),
            use_dictionary=["image_id", "sex", "view"],
        )


def _part_table(
    index: np.ndarray,
    ids: list[str],
    lab: np.ndarray,
    patient: int,
    follow_ups: int,
    size: int,
    img_rng: np.random.Generator,
    signal: float,
    sums: list | None,
) -> pa.Table:
    """The rows ``index`` of a split with planted images; adds their pixels to ``sums`` (train only)."""
    pixels = []
    for i in index:
        img = planted_image(lab[i], size, img_rng, signal)
        if sums is not None:
            f = img.astype(np.float64) / 255.0
            sums[0] += f.sum()
            sums[1] += (f * f).sum()
            sums[2] += f.size
        pixels.append(img.tobytes())
    m = len(index)
    return pa.table(
        {
            "image_id": [ids[i] for i in index],
            "patient_id": pa.array(patient + index // max(follow_ups, 1), pa.int64()),
            "labels": pa.array([list(map(int, r)) for r in lab[index]], pa.list_(pa.uint8())),
            "age": pa.array(img_rng.integers(1, 95, m), pa.int16()),
            "sex": pa.array(img_rng.choice(["M", "F"], m).tolist(), pa.string()),
            "view": pa.array(img_rng.choice(["PA", "AP"], m).tolist(), pa.string()),
            "follow_up": pa.array(index % max(follow_ups, 1), pa.int32()),
            "orig_width": pa.array(np.full(m, size), pa.int32()),
            "orig_height": pa.array(np.full(m, size), pa.int32()),
            "pixels": pa.array(pixels, pa.binary()),
        },
        schema=SCHEMA,
    )
