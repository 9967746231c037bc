"""Batches that mix several stores, with each store's labels widened to the model's findings.

One :class:`~cxrflow.data.loader.StoreLoader` per store streams its train split exactly as a run on
that store alone would (storage-order row groups, shuffled windows, i.i.d. rows). Each epoch the
mixer lays out one slot per row it will yield -- ``counts[i]`` slots for store ``i``
(:func:`mix_counts`) -- shuffles the slots with a generator seeded from ``(seed, epoch, rank)``
(:func:`slot_order`) and fills each batch's slots with the next rows of the stores they name. With
every store weighing 1 each row of every store is yielded once per epoch and the stores' shares of
a batch follow their row counts; ``--store-weights`` scales a store's rows (weight 2: its rows are
drawn twice as often), the epoch keeping the same total number of rows (a store drawn more than it
has rows starts its next shuffle; one drawn less leaves the rest for later epochs' shuffles).

:func:`widen` puts a store's labels in the model's columns: a model finding the store does not
label has ``known`` 0 for its rows, so the masked loss (:func:`cxrflow.data.uncertain.masked_bce`)
gives it neither loss nor gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

#: Added to a store loader's epoch for each further pass over it within one mixed epoch.
PASS_STRIDE = 1_000_003


def mix_counts(rows: Sequence[int], weights: Sequence[float], total: int) -> list[int]:
    """Rows drawn from each store in an epoch of ``total`` rows: shares proportional to
    ``weight * rows``, rounded by largest remainder (ties to the earlier store); they sum to ``total``."""
    raw = [float(w) * int(n) for w, n in zip(weights, rows)]
    whole = sum(raw)
    if whole <= 0:
        return [0] * len(raw)
    exact = [total * r / whole for r in raw]
    counts = [math.floor(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))[: total - sum(counts)]:
        counts[i] += 1
    return counts


def slot_order(counts: Sequence[int], seed: int, epoch: int, rank: int = 0) -> np.ndarray:
    """The store index of every row slot of an epoch, shuffled (a pure function of its arguments)."""
    slots = np.repeat(np.arange(len(counts)), np.asarray(counts, dtype=np.int64))
    np.random.default_rng([int(seed), int(epoch), int(rank), 0x6D6978]).shuffle(slots)
    return slots


def widen(batch: dict[str, Any], model_index: Sequence[int], k: int) -> dict[str, Any]:
    """``batch`` with ``labels`` and ``known`` float32 ``[N, k]`` in the model's columns; the model's
    findings the store does not label are 0 and not known."""
    n = int(batch["labels"].shape[0])
    index = torch.as_tensor(list(model_index), dtype=torch.long)
    labels = torch.zeros((n, k), dtype=torch.float32)
    known = torch.zeros((n, k), dtype=torch.float32)
    labels[:, index] = batch["labels"].float()
    known[:, index] = batch["known"].float()
    return {**batch, "labels": labels, "known": known}


_TENSORS = ("image", "labels", "known", "demographics", "patient_id")


def _cat(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if len(parts) == 1:
        return parts[0]
    out: dict[str, Any] = {key: torch.cat([p[key] for p in parts]) for key in _TENSORS}
    out["image_id"] = [i for p in parts for i in p["image_id"]]
    return out


class _Rows:
    """The rows of one store's loader, taken a few at a time; a new shuffle starts when it runs out."""

    def __init__(self, loader: Any, epoch: int):
        self.loader, self.epoch, self.passes = loader, int(epoch), 0
        self.batches: Iterator[dict[str, Any]] = iter(())
        self.current: dict[str, Any] | None = None
        self.offset = 0

    def _next_batch(self) -> dict[str, Any]:
        for _ in range(2):
            batch = next(self.batches, None)
            if batch is not None:
                return batch
            self.loader.set_epoch(self.epoch + self.passes * PASS_STRIDE)
            self.passes += 1
            self.batches = iter(self.loader)
        raise RuntimeError("a store loader yielded no rows")

    def take(self, n: int) -> dict[str, Any]:
        parts = []
        while n > 0:
            if self.current is None or self.offset >= len(self.current["image_id"]):
                self.current, self.offset = self._next_batch(), 0
            m = min(n, len(self.current["image_id"]) - self.offset)
            lo, hi = self.offset, self.offset + m
            parts.append({**{k: self.current[k][lo:hi] for k in _TENSORS if k in self.current},
                          "image_id": list(self.current["image_id"][lo:hi])})  # fmt: skip
            self.offset, n = hi, n - m
        return _cat(parts)

    def close(self) -> None:
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()


class MixedLoader:
    """Iterable of batches mixing several stores' loaders (one rank's share); see the module docstring.

    ``loaders``: one :class:`~cxrflow.data.loader.StoreLoader` per store (this rank, shuffled, no
    drop_last); ``model_index``: per store, the model column of each of its findings; ``k``: the
    model's findings. ``len()`` is the number of batches per epoch.
    """

    def __init__(
        self,
        loaders: Sequence[Any],
        model_index: Sequence[Sequence[int]],
        k: int,
        *,
        weights: Sequence[float],
        batch_size: int,
        drop_last: bool,
        seed: int,
        epoch: int,
        rank: int = 0,
    ):
        self.loaders, self.model_index, self.k = list(loaders), [list(m) for m in model_index], int(k)
        self.batch_size, self.seed, self.epoch, self.rank = int(batch_size), int(seed), int(epoch), int(rank)
        rows = [int(loader.num_rows) for loader in self.loaders]
        self.total_rows = sum(rows)
        self.counts = mix_counts(rows, weights, self.total_rows)
        full, rest = divmod(self.total_rows, self.batch_size)
        self.num_batches = full + (1 if rest and not drop_last else 0)
        self.num_rows = min(self.total_rows, self.num_batches * self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slots = slot_order(self.counts, self.seed, self.epoch, self.rank)[: self.num_rows]
        streams = [_Rows(loader, self.epoch) for loader in self.loaders]
        try:
            for start in range(0, len(slots), self.batch_size):
                part = slots[start : start + self.batch_size]
                pieces = [
                    widen(streams[i].take(int(c)), self.model_index[i], self.k)
                    for i, c in enumerate(np.bincount(part, minlength=len(streams)))
                    if c
                ]
                yield _cat(pieces)
        finally:
            for stream in streams:
                stream.close()
