"""Identities that bind a result to what produced it: a checkpoint's content hash and a split's
content hash (its image ids and labels; a store's splits: :func:`cxrflow.data.store.store_identity`).

A training run records the identity of its store's splits in the checkpoint's config; ``evaluate``
compares it with the store it is given, so a model is never scored on another dataset's split by
mistake. An evaluation records its checkpoint's hash; whoever uses the evaluation later (report,
predict's thresholds) checks it against the checkpoint now in the run
(:func:`cxrflow.runs.evaluation_status`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

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
