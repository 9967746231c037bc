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

import hashlib
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from cxrflow import __version__, safeio
from cxrflow.data.labels import LabelVocabulary
from cxrflow.data.manifest import (  # noqa: F401 - the store's manifest, read without pyarrow
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    _is_int,
    _is_number,
    check_manifest,
    check_partition,
    pixel_stats,
    read_manifest,
    split_dir,
)
from cxrflow.errors import CxrflowError
from cxrflow.identity import split_identity
from cxrflow.names import printable

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
    pixel_stats: dict[str, dict[str, float]],  # noqa: F811 - the key it fills, not the reader of the same name
    train_positives: Sequence[int],
) -> dict:
    """The manifest keys every store has: version, labels, sizes, rows, pixel and label statistics.

    ``pos_weight`` is negatives / positives per finding over the train split (1 positive at least).
    """
    n_train = next(iter(rows.values()), {}).get("train", 0) if rows else 0
    return {
        "format_version": FORMAT_VERSION,
        "cxrflow_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "label_names": list(vocab.names),
        "vocabulary": vocab.to_dict(),
        "sizes": [int(s) for s in sizes],
        "rows": rows,
        "pixel_stats": pixel_stats,
        "positives": {name: int(p) for name, p in zip(vocab.names, train_positives)},
        "pos_weight": [float((n_train - int(p)) / max(int(p), 1)) for p in train_positives],
    }


def format_manifest(manifest: dict) -> str:
    """Human-readable summary of a manifest (for ``cxrflow store-info``)."""
    lines = [
        f"cxrflow store, format {manifest.get('format_version')}, written by cxrflow "
        f"{manifest.get('cxrflow_version', '?')} on {_when(manifest.get('created', '?'))}"
        + (f", collection format {manifest['format']}" if "format" in manifest else ""),
        f"findings ({len(manifest.get('label_names', []))}): {', '.join(manifest.get('label_names', []))}",
        f"sizes: {', '.join(str(s) for s in manifest.get('sizes', []))}",
    ]
    lines += _rows_table(manifest)
    lines += _source_lines(manifest.get("source", {}))
    unknown = manifest.get("demographics_unknown")
    if unknown:
        lines.append(
            "demographics unknown to a fused model (raw values kept): "
            + ", ".join(f"{k} {v}" for k, v in unknown.items())
        )
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
        wide = max([20, *(len(printable(n)) for n in names)])
        for n, w in zip(names, pw):
            lines.append(f"  {printable(n):<{wide}} {pos.get(n, '?'):>7}  {w:8.2f}")
    counts = manifest.get("label_counts", {})
    if counts and "uncertain_policies" in manifest:
        lines.append(
            "train labels: positive / negative / uncertain / not mentioned "
            f"(--uncertain {'|'.join(manifest['uncertain_policies'])} decides the uncertain ones):"
        )
        for n in names:
            c = counts.get(n, {})
            lines.append(
                f"  {printable(n):<26} {c.get('positive', 0):>7} {c.get('negative', 0):>7} "
                f"{c.get('uncertain', 0):>7} {c.get('unknown', 0):>7}"
            )
    if manifest.get("split"):
        lines.append("split: " + _split_text(manifest["split"]))
    order = manifest.get("row_order")
    lines.append(
        f"row order: {order['kind']} (seed {order.get('seed')})"
        if order
        else "row order: image_id (store written before shuffled rows)"
    )
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
            f"parquet: {parquet.get('compression')} compression, {parquet.get('rows_per_file')} images per file, "
            f"rows per row group {_per_size(parquet.get('row_group_rows'))}"
        )
    return "\n".join(map(printable, lines))  # a manifest's names and paths are data: never terminal controls


def _per_size(value: object) -> str:
    """``{'16': 32, '64': 8}`` as ``32 (size 16), 8 (size 64)``; a plain value as it is."""
    if isinstance(value, dict):
        return ", ".join(f"{v} (size {k})" for k, v in value.items())
    return str(value)


def _when(created: object) -> str:
    """An ISO time stamp as ``2026-12-07 15:36 UTC`` (as it is when it does not parse)."""
    try:
        return datetime.fromisoformat(str(created)).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return str(created)


def _rows_table(manifest: dict) -> list[str]:
    """Images per size and split, with the train pixel statistics, as aligned columns."""
    rows = manifest.get("rows", {})
    splits = [s for s in SPLITS if any(s in per for per in rows.values())]
    lines = ["images per split:", f"  {'size':>5}" + "".join(f"  {s:>7}" for s in splits) + "  train pixel mean / std"]
    for size, per_split in rows.items():
        stats = manifest.get("pixel_stats", {}).get(size) or {}
        shown = (
            f"{stats['mean']:.3f} / {stats['std']:.3f}"
            if stats.get("mean") is not None and stats.get("std") is not None
            else "n/a (no train images)"
        )
        lines.append(f"  {size:>5}" + "".join(f"  {per_split.get(s, 0):>7,}" for s in splits) + f"  {shown}")
    return lines


def _source_lines(source: dict) -> list[str]:
    """Where the images came from and what became of them, in words."""
    if not source:
        return []
    said = {
        "data_dir",
        "metadata_rows",
        "images_found",
        "written",
        "missing",
        "quarantined",
        "unlisted_on_disk",
        "age_unknown",
    }
    counts = [
        f"{source[k]:,} {what}"
        for k, what in (
            ("metadata_rows", "metadata rows"),
            ("images_found", "images found"),
            ("written", "written"),
            ("missing", "missing on disk"),
            ("quarantined", "quarantined"),
            ("unlisted_on_disk", "on disk but not in the metadata"),
            ("age_unknown", "with no usable age"),
        )
        if isinstance(source.get(k), int)
    ]
    counts += [
        f"{k.replace('_', ' ')} {v}" for k, v in source.items() if k not in said and not isinstance(v, (list, dict))
    ]
    return [f"source: {source.get('data_dir', '?')}"] + (["  " + ", ".join(counts)] if counts else [])


def _split_text(split: dict) -> str:
    """How the store's patients were split, in words."""
    mode, seed, fraction = split.get("mode"), split.get("seed"), split.get("val_fraction")
    if mode == "official-lists" and fraction is not None:
        how = f"the official test list; the other patients {1 - fraction:.0%} train / {fraction:.0%} val (seed {seed})"
    elif mode == "official-split":
        how = "the collection's own train / val / test split"
    elif mode == "split-csv":
        how = f"as in the split file {split.get('split_csv', '?')}"
    elif mode == "patients-70-10-20":
        how = f"no official split: all patients 70 / 10 / 20 train / val / test (seed {seed})"
    else:
        how = f"{mode} (seed {seed})"
    patients = split.get("patients")
    if isinstance(patients, dict) and patients:
        how += "; patients: " + ", ".join(
            f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in patients.items()
        )
    return how


def schema_problems(schema: pa.Schema, columns: Sequence[str], known: bool = False) -> list[str]:
    """The ``columns`` of a part's ``schema`` that are missing or not of the store's type (from the
    footer alone, no row read), in words: ``labels (list<item: int64>, expected list<item: uint8>)``."""
    expected = schema_for(known)
    problems = []
    for name in columns:
        if name not in schema.names:
            problems.append(f"{name} (missing)")
        elif name in expected.names and schema.field(name).type != expected.field(name).type:
            problems.append(f"{name} ({schema.field(name).type}, expected {expected.field(name).type})")
    return problems


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
                known = "uncertain_policies" in manifest  # such stores have the label states column
                wrong = schema_problems(schema, schema_for(known).names, known)
                if wrong:
                    problems.append(f"{f}: not in the store's schema: {', '.join(wrong)}")
            rows_read += count
            if count != expected:
                problems.append(f"{folder}: {count} rows in readable parts, the manifest says {expected}")
    return problems, files_read, rows_read


def store_split_identity(store: str | os.PathLike, size: int, split: str) -> str:
    """:func:`split_identity` of one (size, split) partition, read from its id and label columns only."""
    import pyarrow.parquet as pq

    ids: list[str] = []
    labels: list[list[int]] = []
    for path in sorted(split_dir(store, size, split).glob("*.parquet")):
        table = pq.read_table(path, columns=["image_id", "labels"])
        ids.extend(table.column("image_id").to_pylist())
        labels.extend(table.column("labels").to_pylist())
    return split_identity(ids, labels)


def store_identity(store: str | os.PathLike, manifest: dict, size: int) -> dict[str, str]:
    """Identity of every split of the store at ``size``: the manifest's when recorded, else computed."""
    recorded = manifest.get("split_identity") or {}
    rows = manifest.get("rows", {}).get(str(int(size)), {})
    return {split: recorded.get(split) or store_split_identity(Path(store), size, split) for split in rows}


def _matches(candidate: Path, identity: dict, size: int) -> bool:
    """Whether ``candidate`` is a store holding exactly the splits ``identity`` records at ``size``
    (the manifest's recorded identity: one small JSON read; computed only for older stores)."""
    try:
        manifest = read_manifest(candidate)
        if int(size) not in manifest["sizes"]:
            return False
        recorded = manifest.get("split_identity") or {}
        if any(recorded.get(split) not in (None, h) for split, h in identity.items()):
            return False  # settled by the manifest alone, no part read
        now = store_identity(candidate, manifest, int(size))
    except (CxrflowError, OSError, KeyError, ValueError):
        return False
    return all(now.get(split) == h for split, h in identity.items())


def moved_store_candidates(recorded: str, run: Path | None, recorded_run: str | None) -> tuple[list[Path], list[Path]]:
    """Where a store that is no longer at its ``recorded`` path may be now: (the recorded path as the
    run sees it, the stores around), each in the order they are tried.

    1. The recorded path as the run sees it: a relative path (runs of older versions) from the
       folder the run was trained from; an absolute one moved along with the run (the store's place
       relative to the run's old place ``recorded_run``, applied to the run's place now).
    2. The stores beside the run, beside the run's parent folder, and in the current folder.
    """
    store = Path(recorded)
    firsts: list[Path] = []
    if run is not None and recorded_run:
        old_run = Path(recorded_run)
        if not old_run.is_absolute():  # trained from the folder that held OUT as given
            depth = len(old_run.parts)
            if 0 < depth <= len(run.parents) and not store.is_absolute():
                firsts.append(run.parents[depth - 1] / store)
        elif store.is_absolute():
            firsts.append(run / os.path.relpath(store, old_run))
    beside = []
    for folder in [*([run.parent, run.parent.parent] if run is not None else []), Path.cwd()]:
        try:
            beside += sorted(p for p in folder.iterdir() if (p / MANIFEST_NAME).is_file())
        except OSError:
            continue
    firsts = [Path(os.path.normpath(p.absolute())) for p in firsts]
    return firsts, [p for p in dict.fromkeys(p.absolute() for p in beside) if p not in firsts]


def locate_store(
    recorded: str,
    identity: dict | None,
    size: int,
    *,
    run: str | os.PathLike | None = None,
    recorded_run: str | None = None,
) -> Path:
    """The store a run was trained on: the absolute ``recorded`` path when a store is there, else the
    first of :func:`moved_store_candidates` holding the same splits (by ``identity``, at ``size``;
    a relative record is also tried from the current folder); else one CxrflowError naming the
    stale path (``--store`` points at the store explicitly)."""
    path = Path(recorded)
    if path.is_absolute() and (path / MANIFEST_NAME).exists():
        return path
    run_path = Path(os.path.abspath(run)) if run is not None else None
    firsts, beside = moved_store_candidates(recorded, run_path, recorded_run)
    if not path.is_absolute():  # a relative record (older runs): from the run's old working folder, then this one
        firsts.append(Path(os.path.abspath(path)))
    if identity:
        found = next((c for c in [*firsts, *beside] if _matches(c, identity, size)), None)
    else:  # a run of an older version records no identity: only its own path, re-anchored, is trusted
        found = next((c for c in firsts if (c / MANIFEST_NAME).is_file()), None)
    if found is not None:
        return found
    whose = f" of run {run_path}" if run_path is not None else ""
    raise CxrflowError(
        f"store {recorded}{whose} is gone (moved?) and no store with its splits is beside the run or in the "
        "current folder; give it with --store"
    )


def run_store(config: dict, given: str | os.PathLike | None = None, *, run: str | os.PathLike | None = None) -> Path:
    """The store a run was trained on, as it is now: ``given`` (``--store``) when there is one, else
    the store its ``config`` records, found by identity where it moved (:func:`locate_store`).

    The one resolver of a run's recorded store path: evaluate, localize, the report's run context,
    export and ``train --resume`` all ask here. ``run`` is the run folder as it is now.
    """
    if given is not None:
        return Path(given)
    recorded = config.get("store")
    if not recorded:
        raise CxrflowError("the run does not record its store; give it with --store")
    return locate_store(
        str(recorded), config.get("store_identity"), int(config.get("size") or 0), run=run,
        recorded_run=None if config.get("out") is None else str(config["out"]),
    )  # fmt: skip
