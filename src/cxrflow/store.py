"""The Parquet store: layout, schema, manifest. Written by the ETL, read by the loader.

Layout (hive-partitioned, one dataset for every size)::

    STORE/_manifest.json                     written last: its presence means the store is complete
    STORE/size=<S>/split=<train|val|test>/part-*.parquet

Columns (names are a contract): ``image_id`` string, ``patient_id`` int64, ``labels`` list<uint8>
(one entry per finding, manifest order), ``age`` int16, ``sex`` string (M/F), ``view`` string
(PA/AP), ``follow_up`` int32, ``orig_width``/``orig_height`` int32, ``pixels`` binary (S*S bytes,
uint8 grayscale, row-major).
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from cxrflow import __version__
from cxrflow.errors import CxrflowError
from cxrflow.labels import LabelVocabulary

#: Bumped whenever the layout or the columns change incompatibly.
FORMAT_VERSION = 1
MANIFEST_NAME = "_manifest.json"
SPLITS = ("train", "val", "test")

SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("patient_id", pa.int64()),
        ("labels", pa.list_(pa.uint8())),
        ("age", pa.int16()),
        ("sex", pa.string()),
        ("view", pa.string()),
        ("follow_up", pa.int32()),
        ("orig_width", pa.int32()),
        ("orig_height", pa.int32()),
        ("pixels", pa.binary()),
    ]
)


#: Target uncompressed bytes of one row group: a reader holds about one at a time.
ROW_GROUP_TARGET_BYTES = 64 * 2**20


def row_group_rows(size: int, rows_per_file: int) -> int:
    """Rows per row group at ``size``: about ROW_GROUP_TARGET_BYTES, never more than a file."""
    return max(1, min(rows_per_file, ROW_GROUP_TARGET_BYTES // (size * size)))


def manifest_core(
    vocab: LabelVocabulary,
    sizes: Sequence[int],
    rows: dict[str, dict[str, int]],
    pixel_stats: dict[str, dict[str, float]],
    train_positives: Sequence[int],
) -> dict:
    """The manifest keys every store has: version, labels, sizes, rows, pixel and label statistics.

    ``pos_weight`` is negatives / positives per finding over the train split (1 positive at least).
    """
    n_train = next(iter(rows.values()), {}).get("train", 0) if rows else 0
    return {
        "format_version": FORMAT_VERSION,
        "cxrflow_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "label_names": list(vocab.names),
        "vocabulary": vocab.to_dict(),
        "sizes": [int(s) for s in sizes],
        "rows": rows,
        "pixel_stats": pixel_stats,
        "positives": {name: int(p) for name, p in zip(vocab.names, train_positives)},
        "pos_weight": [float((n_train - int(p)) / max(int(p), 1)) for p in train_positives],
    }


def split_dir(store: str | os.PathLike, size: int, split: str) -> Path:
    """Folder holding one (size, split) partition."""
    return Path(store) / f"size={int(size)}" / f"split={split}"


def read_manifest(store: str | os.PathLike) -> dict:
    """The store's manifest; a clear error when the store is missing, incomplete or too new."""
    store = Path(store)
    if not store.exists():
        raise CxrflowError("no such store (run 'cxrflow etl' first)", store)
    path = store / MANIFEST_NAME
    if not path.exists():
        raise CxrflowError(f"not a complete cxrflow store: {MANIFEST_NAME} is missing", store)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CxrflowError(f"unreadable manifest: {exc}", path) from None
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CxrflowError(
            f"store format version {version} is newer than this cxrflow supports ({FORMAT_VERSION}); "
            "upgrade cxrflow",
            path,
        )
    return manifest


def check_partition(manifest: dict, store: str | os.PathLike, size: int, split: str) -> Path:
    """The folder of (size, split), or a clear error naming the sizes and splits that exist."""
    sizes = [int(s) for s in manifest.get("sizes", [])]
    if int(size) not in sizes:
        raise CxrflowError(f"size {size} is not in the store; it has sizes {sizes}", store)
    rows = manifest.get("rows", {}).get(str(int(size)), {})
    if split not in rows:
        raise CxrflowError(f"split {split!r} is not in the store; it has {sorted(rows)}", store)
    return split_dir(store, size, split)


def pixel_stats(manifest: dict, size: int) -> tuple[float, float]:
    """(mean, std) of train pixels at ``size``, on the 0..1 scale."""
    stats = manifest["pixel_stats"][str(int(size))]
    return float(stats["mean"]), float(stats["std"])


def format_manifest(manifest: dict) -> str:
    """Human-readable summary of a manifest (for ``cxrflow store-info``)."""
    lines = [
        f"cxrflow store, format {manifest.get('format_version')}, written by cxrflow "
        f"{manifest.get('cxrflow_version', '?')} at {manifest.get('created', '?')}",
        f"findings ({len(manifest.get('label_names', []))}): {', '.join(manifest.get('label_names', []))}",
        f"sizes: {', '.join(str(s) for s in manifest.get('sizes', []))}",
        "rows:",
    ]
    for size, per_split in manifest.get("rows", {}).items():
        cells = ", ".join(f"{k} {v}" for k, v in per_split.items())
        stats = manifest.get("pixel_stats", {}).get(size, {})
        extra = f"  (train pixel mean {stats['mean']:.4f}, std {stats['std']:.4f})" if stats else ""
        lines.append(f"  {size:>5}: {cells}{extra}")
    src = manifest.get("source", {})
    if src:
        lines.append("source: " + ", ".join(f"{k} {v}" for k, v in src.items() if not isinstance(v, (list, dict))))
    unknown = manifest.get("demographics_unknown")
    if unknown:
        lines.append("demographics unknown to a fused model (raw values kept): "
                     + ", ".join(f"{k} {v}" for k, v in unknown.items()))
    quarantined = manifest.get("quarantined", [])
    if quarantined:
        lines.append(f"quarantined ({len(quarantined)}):")
        for q in quarantined[:20]:
            lines.append(f"  {q.get('image_id')}: {q.get('reason')}")
        if len(quarantined) > 20:
            lines.append(f"  ... and {len(quarantined) - 20} more (see {MANIFEST_NAME})")
    missing = manifest.get("missing", [])
    if missing:
        more = f" ... and {len(missing) - 10} more (see {MANIFEST_NAME})" if len(missing) > 10 else ""
        lines.append(f"missing on disk ({len(missing)}): {', '.join(missing[:10])}{more}")
    names = manifest.get("label_names", [])
    pw = manifest.get("pos_weight", [])
    pos = manifest.get("positives", {})
    if names and pw:
        lines.append("train positives / pos_weight:")
        for n, w in zip(names, pw):
            lines.append(f"  {n:<20} {pos.get(n, '?'):>7}  {w:8.2f}")
    split = manifest.get("split", {})
    if split:
        lines.append("split: " + ", ".join(f"{k}={v}" for k, v in split.items()))
    if "wall_seconds" in manifest:
        job = manifest.get("spark_job_seconds")
        lines.append(
            f"ETL wall time {manifest['wall_seconds']:.1f} s"
            + (f" (Spark job {job:.1f} s on {manifest.get('spark_master', '?')})" if job is not None else "")
            + f", {manifest.get('images_per_second') or 0:.1f} images/s"
        )
    parquet = manifest.get("parquet", {})
    if parquet:
        lines.append(
            f"parquet: {parquet.get('compression')} compression, images per file {parquet.get('rows_per_file')}, "
            f"rows per row group {parquet.get('row_group_rows')}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="store folder written by 'cxrflow etl'")
    parser.add_argument("--json", action="store_true", help="print the raw manifest as JSON")


def run(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.store)
    print(json.dumps(manifest, indent=2) if args.json else format_manifest(manifest))
    return 0
