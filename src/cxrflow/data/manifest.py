"""A store's manifest (``STORE/_manifest.json``): reading it, checking its shape, its partitions.

Everything here is plain JSON and paths, without pyarrow, so a command checks a ``--store`` before
any heavy library is imported. The layout and columns are described in :mod:`cxrflow.data.store`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from cxrflow.atomic import read_json_object
from cxrflow.errors import CxrflowError

#: Bumped whenever the layout or the columns change incompatibly.
FORMAT_VERSION = 2
MANIFEST_NAME = "_manifest.json"
SPLITS = ("train", "val", "test")


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
            f"store format version {version} is newer than this cxrflow supports ({FORMAT_VERSION}); upgrade cxrflow",
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
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise bad("label_names", f"a list of distinct finding names ({twice!r:.40} is there twice)", names)
    sizes = manifest.get("sizes")
    if not isinstance(sizes, list) or not sizes or not all(_is_int(s) and s > 0 for s in sizes):
        raise bad("sizes", "a non-empty list of positive integers", sizes)
    if len(set(sizes)) != len(sizes):
        raise bad("sizes", "a list of distinct sizes", sizes)
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
    if (
        not isinstance(weights, list)
        or len(weights) != len(names)
        or not all(_is_number(w) and w >= 0 for w in weights)
    ):
        raise bad("pos_weight", f"a list of {len(names)} non-negative numbers (one per finding)", weights)
    _check_positives(manifest, names, sizes, bad)
    identity = manifest.get("split_identity", {})  # absent in stores written before it existed
    if not isinstance(identity, dict) or not all(
        split in SPLITS and isinstance(h, str) for split, h in identity.items()
    ):
        raise bad("split_identity", f"an object of sha256 strings per split ({', '.join(SPLITS)})", identity)


def _check_positives(manifest: dict, names: list, sizes: list, bad) -> None:
    """Train positives per finding, where recorded: the manifest's findings, each at most the train rows."""
    positives = manifest.get("positives")
    if positives is None:
        return
    train = max(int((manifest["rows"].get(str(s)) or {}).get("train", 0)) for s in sizes)
    if not isinstance(positives, dict) or set(positives) != set(names):
        raise bad("positives", "an object of train positives for each finding in label_names", positives)
    wrong = next((n for n, v in positives.items() if not (_is_int(v) and 0 <= v <= train)), None)
    if wrong is not None:
        raise bad(f"positives.{wrong}", f"an integer in 0..{train} (the train rows)", positives[wrong])


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
