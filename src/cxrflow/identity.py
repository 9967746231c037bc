"""Identities that bind a result to what produced it: a checkpoint's content hash and a split's
content hash (its image ids and labels).

A training run records the identity of its store's splits in the checkpoint's config; ``evaluate``
compares it with the store it is given, so a model is never scored on another dataset's split by
mistake. An evaluation records its checkpoint's hash; whoever uses the evaluation later (report,
predict's thresholds) checks it against the checkpoint now in the run
(:func:`cxrflow.results.evaluate.evaluation_status`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cxrflow import safeio

_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with safeio.open_regular(path, "file to hash") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def split_identity(image_ids: Sequence[str], labels: Iterable[Sequence[int]]) -> str:
    """Hex sha256 of a split's (image_id, labels) pairs, independent of their row order."""
    pairs = sorted(zip(map(str, image_ids), (bytes(np.asarray(row, dtype=np.uint8)) for row in labels)))
    h = hashlib.sha256()
    for image_id, lab in pairs:
        h.update(image_id.encode())
        h.update(b"\t")
        h.update(lab.hex().encode())
        h.update(b"\n")
    return h.hexdigest()


def store_split_identity(store: str | os.PathLike, size: int, split: str) -> str:
    """:func:`split_identity` of one (size, split) partition, read from its id and label columns only."""
    import pyarrow.parquet as pq

    from cxrflow.data.store import split_dir

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
