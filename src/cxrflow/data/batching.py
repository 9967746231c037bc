"""Shuffled whole batches for :mod:`cxrflow.data.loader`: decoded row blocks gathered into a
shuffle *window*, permuted and cut into batches whose tensors share one packed buffer that is reused
once the consumer drops the batch; the next blocks are read ahead by a background thread.
"""

from __future__ import annotations

import collections
import math
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from cxrflow.data.rowreader import Rows

# --------------------------------------------------------------------------------------------
# Output memory
#
# A 512-px batch of 32 is 8 MiB. Fresh memory for every batch costs a page fault per 4 KiB on first
# write (and, from a DataLoader worker, a new shared-memory file whose pages fault in both
# processes): more than the copy itself. So each batch's four tensors live in one packed buffer,
# and the buffers are reused once the consumer has dropped every tensor of the batch.

#: Buffers kept for reuse per process: the batches queued by the DataLoader plus those the consumer
#: still holds. When all are in use, a batch gets fresh memory (never waits, never overwrites).
POOL_SLOTS = 6

#: Row groups read ahead by the background reading thread.
_READ_AHEAD = 2

_FIELDS = ("image", "labels", "patient_id", "demographics", "known")


def _layout(n: int, size: int, num_labels: int) -> tuple[list[tuple[str, int, tuple[int, ...], torch.dtype]], int]:
    """Where each tensor of an ``n``-row batch lies in its packed uint8 buffer (64-byte aligned), and its bytes."""
    specs = (
        ("image", (n, 1, size, size), torch.uint8),
        ("labels", (n, num_labels), torch.float32),
        ("patient_id", (n,), torch.int64),
        ("demographics", (n, 3), torch.float32),
        ("known", (n, num_labels), torch.float32),
    )
    out, offset = [], 0
    for name, shape, dtype in specs:
        out.append((name, offset, shape, dtype))
        offset += -(-math.prod(shape) * dtype.itemsize // 64) * 64
    return out, offset


def unpack(packed: torch.Tensor, n: int, size: int, num_labels: int) -> dict[str, torch.Tensor]:
    """The batch tensors as views of one packed uint8 buffer (see :func:`_layout`)."""
    fields, _ = _layout(n, size, num_labels)
    return {
        name: packed[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for name, offset, shape, dtype in fields
    }


def _new_shared(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor in shared memory, so that handing it from a DataLoader
    worker to the main process costs no copy (the same trick as torch's default_collate)."""
    proto = torch.empty(0, dtype=torch.uint8)
    return proto.new(proto._typed_storage()._new_shared(nbytes, device="cpu"))


class LocalSlots:
    """Reusable output buffers in this process. A buffer is free again when nothing but the pool
    refers to it: batch tensors are made with ``torch.from_numpy``, which holds the array."""

    def __init__(self) -> None:
        self.slots: list[np.ndarray] = []
        self.free_refs = 0

    def take(self, nbytes: int, capacity: int) -> tuple[torch.Tensor, int]:
        for k in range(len(self.slots)):
            if len(self.slots[k]) >= nbytes and _refs(self.slots, k) == self.free_refs:
                return torch.from_numpy(self.slots[k][:nbytes]), k
        if len(self.slots) < POOL_SLOTS:
            self.slots.append(np.empty(max(nbytes, capacity), dtype=np.uint8))
            self.free_refs = _refs(self.slots, len(self.slots) - 1)
            return torch.from_numpy(self.slots[-1][:nbytes]), len(self.slots) - 1
        return torch.empty(nbytes, dtype=torch.uint8), -1


def _refs(slots: list[np.ndarray], k: int) -> int:
    return sys.getrefcount(slots[k])


class SharedSlots:
    """Reusable shared-memory output buffers of one DataLoader worker. ``busy`` (shared with the
    main process, one flag per buffer) is set here when a buffer is filled and cleared by the main
    process once the consumer has dropped the batch (see :meth:`StoreLoader.__iter__`)."""

    def __init__(self, busy: np.ndarray):
        self.busy = busy
        self.slots: list[torch.Tensor] = []

    def take(self, nbytes: int, capacity: int) -> tuple[torch.Tensor, int]:
        for k, slot in enumerate(self.slots):
            if not self.busy[k] and len(slot) >= nbytes:
                self.busy[k] = 1
                return slot[:nbytes], k
        if len(self.slots) < len(self.busy):
            self.slots.append(_new_shared(max(nbytes, capacity)))
            self.busy[len(self.slots) - 1] = 1
            return self.slots[-1][:nbytes], len(self.slots) - 1
        return _new_shared(nbytes), -1


class OneOff:
    """Fresh output memory for every batch (shared memory inside a worker of a caller's own DataLoader)."""

    def __init__(self, shared: bool):
        self.shared = shared

    def take(self, nbytes: int, capacity: int) -> tuple[torch.Tensor, int]:
        return (_new_shared(nbytes) if self.shared else torch.empty(nbytes, dtype=torch.uint8)), -1


# --------------------------------------------------------------------------------------------
# Shuffling and batching


class _Window:
    """Decoded blocks laid end to end (zero-copy views over their Arrow buffers), indexed as one."""

    def __init__(self, blocks: list[Rows]):
        self.blocks = blocks
        self.starts = np.cumsum([0] + [len(b) for b in blocks])

    def segments(self, index: np.ndarray) -> Iterator[tuple[slice, Rows, np.ndarray]]:
        """For ascending window rows ``index``: (positions in ``index``, block, rows in that block)."""
        cuts = np.searchsorted(index, self.starts)
        for b, block in enumerate(self.blocks):
            lo, hi = int(cuts[b]), int(cuts[b + 1])
            if hi > lo:
                yield slice(lo, hi), block, index[lo:hi] - self.starts[b]

    def gather(self, index: np.ndarray, packed: torch.Tensor, size: int, num_labels: int) -> dict[str, Any]:
        """Rows ``index`` (ascending) copied once, straight from the blocks into the packed buffer."""
        n = len(index)
        tensors = unpack(packed, n, size, num_labels)
        outs = [tensors[name].numpy().reshape(n, -1) for name in _FIELDS] + [np.empty(n, dtype=object)]
        for at, block, rows in self.segments(index):
            for out, src in zip(outs, block.arrays()):
                if out.dtype == object or src.dtype != out.dtype:
                    out[at] = src[rows].reshape(len(rows), *out.shape[1:])
                else:
                    np.take(src.reshape(len(src), -1), rows, axis=0, out=out[at])
        return {**tensors, "image_id": outs[-1].tolist()}

    def copy(self, index: np.ndarray) -> Rows:
        """The rows ``index`` (ascending) as a new, small block that owns its memory."""
        parts = [[a[rows] for a in block.arrays()] for _, block, rows in self.segments(index)]
        return Rows(*(np.concatenate(columns) for columns in zip(*parts)))


def window_batches(
    blocks: Iterator[Rows],
    batch_size: int,
    total: int,
    window: int,
    size: int,
    num_labels: int,
    rng: np.random.Generator | None,
    slots: Any,
) -> Iterator[tuple[dict[str, Any], torch.Tensor, int]]:
    """``total`` rows in batches of ``batch_size`` (only the very last may be short), with each
    batch's packed buffer and its slot number (-1: not pooled).

    Blocks are gathered into a window of at least ``window`` rows (whole row groups, never copied);
    with ``rng`` the window's rows are permuted, otherwise they keep stream order. Each batch is
    copied straight from the window's blocks into its output buffer; the fewer than ``batch_size``
    rows left over are copied into a small block that opens the next window, so the window's row
    groups are released as soon as it is used up. Memory: about ``window`` rows plus a row group or two.
    """
    window = max(window, batch_size)
    # no batch holds more than the ``total`` rows there are: a --batch-size beyond the split is one batch,
    # not a buffer sized for rows that do not exist
    capacity = _layout(min(batch_size, max(total, 1)), size, num_labels)[1]
    carry: list[Rows] = []
    remaining = total
    stream = iter(blocks)
    done = False
    while not done:
        parts, n = carry, sum(len(c) for c in carry)
        while n < window:
            block = next(stream, None)
            if block is None:
                done = True
                break
            parts.append(block)
            n += len(block)
        if n == 0:
            break
        view = _Window(parts)
        order = rng.permutation(n) if rng is not None else np.arange(n)
        full = n if done else n - n % batch_size
        for start in range(0, full, batch_size):
            index = order[start : start + batch_size]
            if rng is not None:
                index = np.sort(index)  # the batch's rows are random; reading them in window order is faster
            packed, slot = slots.take(_layout(len(index), size, num_labels)[1], capacity)
            remaining -= len(index)
            yield view.gather(index, packed, size, num_labels), packed, slot
        carry = [view.copy(np.sort(order[full:]))] if full < n else []
        del view, parts, block
    if remaining:
        raise AssertionError(f"stream ended {remaining} rows short")


def read_ahead(blocks: Iterator[Rows], rows: int) -> Iterator[Rows]:
    """``blocks``, read by a background thread up to about ``rows`` rows ahead of the consumer.

    pyarrow's reading and decompression and numpy's copies release the GIL, so the next window is
    read while the current one is cut into batches. Errors are re-raised in the consumer; closing
    the iterator stops the thread.
    """
    cond = threading.Condition()
    ready: collections.deque = collections.deque()
    state = {"rows": 0, "end": False, "error": None, "stop": False}

    def run() -> None:
        try:
            for block in blocks:
                with cond:
                    cond.wait_for(lambda: state["stop"] or state["rows"] < rows)
                    if state["stop"]:
                        return
                    ready.append(block)
                    state["rows"] += len(block)
                    cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
            with cond:
                state["error"] = exc
        finally:
            blocks.close()
            with cond:
                state["end"] = True
                cond.notify_all()

    thread = threading.Thread(target=run, name="cxrflow-loader-read", daemon=True)
    thread.start()
    try:
        while True:
            with cond:
                cond.wait_for(lambda: ready or state["end"])
                if not ready:
                    if state["error"] is not None:
                        raise state["error"]
                    return
                block = ready.popleft()
                state["rows"] -= len(block)
                cond.notify_all()
            yield block
            del block
    finally:
        with cond:
            state["stop"] = True
            ready.clear()
            cond.notify_all()
        thread.join()
