"""What the ETL's driver makes of its Spark job (:mod:`cxrflow.data.etl`): the progress line while it
runs and, from the tasks' small summaries, the store check (pyarrow footers only), the pixel
statistics, the splits' identities and the manifest. No pixel reaches the driver.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self, TextIO

import numpy as np
import pyarrow.parquet as pq

from cxrflow.data.store import SCHEMA, SPLITS, manifest_core, row_order, split_dir
from cxrflow.data.synthetic import synthetic_record
from cxrflow.identity import split_identity
from cxrflow.progress import Progress as Bar


class Progress:
    """Images done / total on a stream from a Spark accumulator (the :class:`cxrflow.progress.Progress`
    bar while the stream is a terminal), then one summary line: images and images per second."""

    def __init__(self, counter, total: int, stream: TextIO, interval: float = 0.5):
        self.counter, self.total, self.stream, self.interval = counter, total, stream, interval
        self.started = time.perf_counter()
        self.bar = Bar(total, "etl", unit="img", stream=stream)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="cxrflow-etl-progress", daemon=True)

    def line(self, done: int) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        pct = 100.0 * done / self.total if self.total else 100.0
        return f"etl: {done}/{self.total} images ({pct:.0f}%), {done / elapsed:.1f} images/s, {elapsed:.0f} s"

    def _loop(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.bar.update(int(self.counter.value))

    def __enter__(self) -> Self:
        if self.bar.shown:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join()
        self.bar.close()
        self.stream.write(self.line(int(self.counter.value)) + "\n")
        self.stream.flush()


def verify_store_files(tmp: Path, sizes: Sequence[int], rows: dict[str, dict[str, int]]) -> None:
    """Check with pyarrow (footers only) that every partition has its rows and the exact schema."""
    import pyarrow.dataset as ds

    dataset = ds.dataset(str(tmp), format="parquet", partitioning="hive")
    for field in SCHEMA:
        got = dataset.schema.field(field.name).type if field.name in dataset.schema.names else None
        if got is not None and got != field.type:
            raise RuntimeError(f"store column {field.name} has type {got}, expected {field.type}")
    for s in sizes:
        for split, n in rows[str(s)].items():
            folder = split_dir(tmp, s, split)
            files = sorted(folder.glob("part-*.parquet")) if folder.exists() else []
            count = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
            if count != n:
                raise RuntimeError(f"store partition size={s}/split={split} has {count} rows, expected {n}")


def pixel_stats_of(histogram: np.ndarray) -> dict[str, float]:
    """Mean and std on the 0..1 scale from a 256-bin count histogram (exact integer sums)."""
    values = np.arange(256, dtype=np.float64) / 255.0
    n = int(histogram.sum())
    if n == 0:
        return {"mean": float("nan"), "std": float("nan")}
    p = histogram.astype(np.float64) / n
    mean = float((p * values).sum())
    var = float((p * (values - mean) ** 2).sum())
    return {"mean": mean, "std": math.sqrt(max(var, 0.0))}


def split_identities(records: Sequence[dict], quarantined: Sequence[dict]) -> dict[str, str]:
    """:func:`cxrflow.identity.split_identity` of every split's written rows (from the metadata: no pixels)."""
    dropped = {q["image_id"] for q in quarantined}
    out = {}
    for split in SPLITS:
        kept = [r for r in records if r["split"] == split and r["image_id"] not in dropped]
        out[split] = split_identity([r["image_id"] for r in kept], [np.frombuffer(r["labels"], np.uint8) for r in kept])
    return out


def build_manifest(
    release, splits, summaries, sizes, vocab, master, val_fraction, seed, compression, group_rows, per_file, job_seconds
) -> dict:
    """The manifest from the tasks' summaries (see :mod:`cxrflow.data.store` for the keys)."""
    k = len(vocab)
    rows = {split: 0 for split in SPLITS}
    positives = np.zeros(k, dtype=np.int64)
    histograms = {s: np.zeros(256, dtype=np.int64) for s in sizes}
    quarantined: list[dict] = []
    processed = 0
    task_seconds = sum(s["seconds"] for s in summaries)
    decode_seconds = sum(s["decode_seconds"] for s in summaries)
    for summary in summaries:
        rows[summary["split"]] += summary["written"]
        processed += summary["images"]
        quarantined.extend(summary["quarantined"])
        if summary["split"] == "train":
            positives += np.asarray(summary["positives"], dtype=np.int64)
            for s in sizes:
                histograms[s] += np.asarray(summary["histograms"][s], dtype=np.int64)
    quarantined.sort(key=lambda q: q["image_id"])
    written = sum(rows.values())
    metadata_rows = len(release.entries)
    missing = list(release.missing)
    if metadata_rows != written + len(missing) + len(quarantined):
        raise RuntimeError(
            f"ETL lost images: {metadata_rows} metadata rows != {written} written + {len(missing)} missing "
            f"+ {len(quarantined)} quarantined"
        )
    return {
        **manifest_core(
            vocab,
            sizes,
            {str(s): dict(rows) for s in sizes},
            {str(s): pixel_stats_of(histograms[s]) for s in sizes},
            positives,
        ),
        "source": {
            "data_dir": str(Path(release.root).absolute()),
            "metadata_rows": metadata_rows,
            "images_found": metadata_rows - len(missing),
            "written": written,
            "missing": len(missing),
            "quarantined": len(quarantined),
            "unlisted_on_disk": len(release.unlisted),
            # the NIH reader counts its unusable ages itself; the other readers leave them at -1
            "age_unknown": int(release.entries.attrs.get("age_unknown", (release.entries["age"] < 0).sum())),
        },
        **synthetic_record(release.root),  # a collection written by cxrflow's generators
        "missing": missing,
        "quarantined": quarantined,
        "split": {
            "mode": splits.attrs.get("mode"),
            **({"split_csv": splits.attrs["split_csv"]} if "split_csv" in splits.attrs else {}),
            # without the official lists the split is 70/10/20 by patient and val_fraction does not apply
            "val_fraction": val_fraction if splits.attrs.get("mode") == "official-lists" else None,
            "seed": seed,
            "patients": {split: int(splits.loc[splits["split"] == split, "patient_id"].nunique()) for split in SPLITS},
        },
        "row_order": row_order(seed),
        "parquet": {
            "compression": compression,
            "rows_per_file": per_file,
            "row_group_rows": {str(s): n for s, n in group_rows.items()},
        },
        "spark_master": master,
        "spark_job_seconds": round(job_seconds, 3),
        "spark_tasks": len(summaries),
        "task_seconds": round(task_seconds, 3),
        "decode_resize_seconds": round(decode_seconds, 3),
        "images_per_second": round(processed / job_seconds, 3) if job_seconds > 0 else None,
    }
