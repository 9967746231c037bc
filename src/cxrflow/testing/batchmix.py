"""How well training batches mix a split: distinct percentiles of image_id order and distinct
patients per batch, against a uniformly random permutation of the same split.

In the NIH release a patient's follow-ups have consecutive image ids, so a batch drawn from a few
hundred consecutive ids covers few patients and few parts of the split. The ETL writes each split
in a seeded pseudo-random row order so the loader's bounded window is already a uniform sample;
this module measures that (``tests/testing/test_batchmix.py``, ``benchmarks/loader.py``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def _per_batch_distinct(keys: np.ndarray, batch_sizes: list[int]) -> float:
    """Mean number of distinct values of ``keys`` per consecutive batch of the given sizes."""
    counts, start = [], 0
    for n in batch_sizes:
        counts.append(np.unique(keys[start : start + n]).size)
        start += n
    return float(np.mean(counts)) if counts else float("nan")


def batch_mixing(
    store: str | os.PathLike,
    size: int,
    split: str = "train",
    *,
    batch_size: int = 32,
    window_fraction: float = 0.01,
    seed: int = 0,
    epoch: int = 0,
) -> dict[str, Any]:
    """One shuffled epoch of :func:`cxrflow.data.loader.make_loader` with its shuffle window at
    ``window_fraction`` of the split, measured against uniform permutations of the same rows.

    Returns ``percentiles`` and ``patients`` (mean distinct per full batch), their ``uniform_*``
    baselines and the ``*_ratio`` of the two, plus ``rows``, ``window`` and ``batches``.
    """
    from cxrflow.data.loader import make_loader
    from cxrflow.data.store import read_manifest

    rows = int(read_manifest(store)["rows"][str(int(size))][split])
    window = max(batch_size, int(round(window_fraction * rows)))
    loader = make_loader(store, size, split, batch_size=batch_size, shuffle=True, seed=seed, epoch=epoch,
                         shuffle_buffer=window, drop_last=True)  # fmt: skip
    ids: list[str] = []
    patients: list[np.ndarray] = []
    for batch in loader:
        ids.extend(batch["image_id"])
        patients.append(batch["patient_id"].numpy().copy())
    patient = np.concatenate(patients) if patients else np.zeros(0, np.int64)
    order = np.argsort(np.asarray(ids), kind="stable")  # rank of each delivered row in image_id order
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(len(ids))
    percentile = rank * 100 // max(len(ids), 1)
    sizes = [batch_size] * (len(ids) // batch_size)
    got_pct = _per_batch_distinct(percentile, sizes)
    got_pat = _per_batch_distinct(patient, sizes)
    rng = np.random.default_rng([seed, epoch, 7])
    uni_pct, uni_pat = [], []
    for _ in range(5):
        perm = rng.permutation(len(ids))
        uni_pct.append(_per_batch_distinct(percentile[perm], sizes))
        uni_pat.append(_per_batch_distinct(patient[perm], sizes))
    u_pct, u_pat = float(np.mean(uni_pct)), float(np.mean(uni_pat))
    return {
        "rows": rows,
        "window": window,
        "batches": len(sizes),
        "batch_size": batch_size,
        "percentiles": got_pct,
        "uniform_percentiles": u_pct,
        "percentiles_ratio": got_pct / u_pct,
        "patients": got_pat,
        "uniform_patients": u_pat,
        "patients_ratio": got_pat / u_pat,
    }
