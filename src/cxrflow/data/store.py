"""The Parquet store: layout, schema, manifest. Written by the ETL, read by the loader.

Layout (hive-partitioned, one dataset for every size)::

    STORE/_manifest.json                     written last: its presence means the store is complete
    STORE/size=<S>/split=<train|val|test>/part-*.parquet

Columns (names are a contract): ``image_id`` string, ``patient_id`` int64, ``labels`` list<uint8>
(one entry per finding, manifest order), ``age`` int16 (-1: unknown, the metadata's age was outside
0-120), ``sex`` string (M/F), ``view`` string
(PA/AP), ``follow_up`` int32, ``orig_width``/``orig_height`` int32, ``pixels`` binary (S*S bytes,
uint8 grayscale, row-major). ``age`` is -1 and ``sex`` ``U`` where the collection does not say;
``view`` is the collection's own (PA, AP, LATERAL, ...). Stores of collections with uncertain or
unmentioned labels (CheXpert, MIMIC-CXR) add ``labels_known`` list<uint8>, the label states of
:mod:`cxrflow.data.uncertain`; the manifest then has ``label_counts`` and ``uncertain_policies``.

Format versions: 1 (NIH only), 2 (adds ``format``, ``label_counts``, optional ``labels_known``).
Every version up to :data:`FORMAT_VERSION` opens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from cxrflow import __version__
from cxrflow.atomic import read_json_object
from cxrflow import safeio
from cxrflow.errors import CxrflowError
from cxrflow.data.labels import LabelVocabulary

#: Bumped whenever the layout or the columns change incompatibly.
FORMAT_VERSION = 2
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

#: The label states column of stores whose collection has unknown labels (see cxrflow.data.uncertain).
KNOWN_COLUMN = "labels_known"


def schema_for(known: bool) -> pa.Schema:
    """The store schema; with ``known``, plus the ``labels_known`` column after ``labels``."""
    if not known:
        return SCHEMA
    return SCHEMA.insert(SCHEMA.get_field_index("labels") + 1, pa.field(KNOWN_COLUMN, pa.list_(pa.uint8())))


#: Target uncompressed bytes of one row group: a reader holds about one at a time.
ROW_GROUP_TARGET_BYTES = 64 * 2**20


def row_group_rows(size: int, rows_per_file: int) -> int:
    """Rows per row group at ``size``: about ROW_GROUP_TARGET_BYTES, never more than a file."""
    return max(1, min(rows_per_file, ROW_GROUP_TARGET_BYTES // (size * size)))


def row_order_key(seed: int, image_id: str) -> int:
    """The sort key of ``image_id``'s row in its split: a keyed hash of (seed, image_id).

    Sorting a split by this key gives a pseudo-random permutation that depends only on the seed and
    the ids (not on the metadata's order or the cluster), so patients' follow-ups are spread over
    the whole split and a loader's window of consecutive rows is already a uniform sample of it.
    """
    digest = hashlib.blake2b(f"{int(seed)}\0{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def row_order(seed: int) -> dict:
    """The manifest's ``row_order`` entry for a store whose splits are sorted by :func:`row_order_key`."""
    return {"kind": "shuffled", "seed": int(seed), "key": "blake2b-64(seed, image_id)"}


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
    if not path.is_file():
        raise CxrflowError("not a regular file (a folder, named pipe or device)", path)
    manifest = read_json_object(path, "manifest")
    version = manifest.get("format_version")
    if not _is_int(version) or version < 1:
        raise CxrflowError(f"manifest field 'format_version' must be a positive integer, got {version!r}", path)
    if version > FORMAT_VERSION:
        raise CxrflowError(
            f"store format version {version} is newer than this cxrflow supports ({FORMAT_VERSION}); "
            "upgrade cxrflow",
            path,
        )
    check_manifest(manifest, path)
    return manifest


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def check_manifest(manifest: dict, path: str | os.PathLike) -> None:
    """One CxrflowError naming the manifest field that does not have the shape readers rely on."""

    def bad(field: str, expected: str, got: object) -> CxrflowError:
        shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:57] + "..."
        return CxrflowError(f"manifest field {field!r} must be {expected}, got {shown}", path)

    names = manifest.get("label_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise bad("label_names", "a non-empty list of finding names", names)
    sizes = manifest.get("sizes")
    if not isinstance(sizes, list) or not sizes or not all(_is_int(s) and s > 0 for s in sizes):
        raise bad("sizes", "a non-empty list of positive integers", sizes)
    rows = manifest.get("rows")
    if not isinstance(rows, dict):
        raise bad("rows", "an object {size: {split: rows}}", rows)
    for size in sizes:
        per_split = rows.get(str(size))
        if not isinstance(per_split, dict) or not all(
            split in SPLITS and _is_int(n) and n >= 0 for split, n in per_split.items()
        ):
            raise bad(f"rows.{size}", f"an object of row counts per split ({', '.join(SPLITS)})", per_split)
    stats = manifest.get("pixel_stats")
    if not isinstance(stats, dict):
        raise bad("pixel_stats", "an object {size: {mean, std}}", stats)
    for size in sizes:
        entry = stats.get(str(size))
        if not isinstance(entry, dict):
            raise bad(f"pixel_stats.{size}", "an object with mean and std", entry)
        mean, std = entry.get("mean"), entry.get("std")
        if mean is None and std is None:
            continue  # a store without train images has no statistics; training refuses it
        if not _is_number(mean) or not 0 <= mean <= 1:
            raise bad(f"pixel_stats.{size}.mean", "a number in 0..1", mean)
        if not _is_number(std) or not 0 < std <= 1:
            raise bad(f"pixel_stats.{size}.std", "a number in (0, 1]", std)
    weights = manifest.get("pos_weight")
    if not isinstance(weights, list) or len(weights) != len(names) or not all(_is_number(w) and w >= 0 for w in weights):
        raise bad("pos_weight", f"a list of {len(names)} non-negative numbers (one per finding)", weights)
    identity = manifest.get("split_identity", {})  # absent in stores written before it existed
    if not isinstance(identity, dict) or not all(split in SPLITS and isinstance(h, str) for split, h in identity.items()):
        raise bad("split_identity", f"an object of sha256 strings per split ({', '.join(SPLITS)})", identity)


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
    if stats.get("mean") is None or stats.get("std") is None:
        raise CxrflowError(f"the store has no train pixel statistics at size {size} (no train images)")
    return float(stats["mean"]), float(stats["std"])


def format_manifest(manifest: dict) -> str:
    """Human-readable summary of a manifest (for ``cxrflow store-info``)."""
    lines = [
        f"cxrflow store, format {manifest.get('format_version')}, written by cxrflow "
        f"{manifest.get('cxrflow_version', '?')} at {manifest.get('created', '?')}"
        + (f", collection format {manifest['format']}" if "format" in manifest else ""),
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
        wide = max([20, *map(len, names)])
        for n, w in zip(names, pw):
            lines.append(f"  {n:<{wide}} {pos.get(n, '?'):>7}  {w:8.2f}")
    counts = manifest.get("label_counts", {})
    if counts and "uncertain_policies" in manifest:
        lines.append("train labels: positive / negative / uncertain / not mentioned "
                     f"(--uncertain {'|'.join(manifest['uncertain_policies'])} decides the uncertain ones):")
        for n in names:
            c = counts.get(n, {})
            lines.append(f"  {n:<26} {c.get('positive', 0):>7} {c.get('negative', 0):>7} "
                         f"{c.get('uncertain', 0):>7} {c.get('unknown', 0):>7}")
    split = manifest.get("split", {})
    if split:
        lines.append("split: " + ", ".join(f"{k}={v}" for k, v in split.items()))
    order = manifest.get("row_order")
    lines.append(f"row order: {order['kind']} (seed {order.get('seed')})" if order else "row order: image_id (store written before shuffled rows)")
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


def verify_store(store: str | os.PathLike, manifest: dict) -> tuple[list[str], int, int]:
    """Read every part's footer and compare row counts and columns with the manifest.

    Returns (problems, files read, rows counted); no problem means every partition the manifest
    lists is there, readable, in the store's schema, with exactly its rows.
    """
    import pyarrow.parquet as pq

    store = Path(store)
    problems: list[str] = []
    files_read = rows_read = 0
    for size, per_split in manifest["rows"].items():
        for split, expected in per_split.items():
            folder = split_dir(store, int(size), split)
            files = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
            if not files and expected:
                problems.append(f"{folder}: missing ({expected} rows expected)")
                continue
            count = 0
            for f in files:
                try:
                    meta = pq.ParquetFile(safeio.regular_file(f, "store part")).metadata
                    schema = meta.schema.to_arrow_schema()
                except Exception as exc:  # any footer that does not parse is a corrupt file
                    problems.append(f"{f}: corrupt ({str(exc).splitlines()[0][:160]})")
                    continue
                files_read += 1
                count += meta.num_rows
                wrong = [n for n in SCHEMA.names if n not in schema.names or schema.field(n).type != SCHEMA.field(n).type]
                if wrong:
                    problems.append(f"{f}: columns {', '.join(wrong)} missing or of the wrong type")
            rows_read += count
            if count != expected:
                problems.append(f"{folder}: {count} rows in readable parts, the manifest says {expected}")
    return problems, files_read, rows_read


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="store folder written by 'cxrflow etl'")
    parser.add_argument("--json", action="store_true", help="print the raw manifest as JSON")
    parser.add_argument("--verify", action="store_true", help="read every part's footer and check rows and columns against the manifest")


def run(args: argparse.Namespace) -> int:
    from cxrflow.outputs import leftovers, read_marker

    manifest = read_manifest(args.store)
    print(json.dumps(manifest, indent=2) if args.json else format_manifest(manifest))
    for folder in leftovers(args.store):
        fate = (f"the next 'cxrflow etl --out {args.store}' removes it" if read_marker(folder, "etl") is not None
                else "it carries no cxrflow etl marker, so cxrflow leaves it to you")  # fmt: skip
        print(f"leftover of a killed run: {folder} ({fate})", file=sys.stderr)
    if args.verify:
        problems, files, rows = verify_store(args.store, manifest)
        for problem in problems:
            print(f"verify: {problem}", file=sys.stderr)
        if problems:
            raise CxrflowError(f"store verification failed: {len(problems)} problem(s) (listed above)", args.store)
        print(f"verify: OK, {files} files, {rows} rows, as the manifest says")
    return 0
