"""Several stores trained on as one: their findings aligned by name, checked, and summed up.

``cxrflow train --store A --store B`` trains one model on every store given. The model's findings
are the union of the stores' findings, matched by name through :mod:`cxrflow.data.alignment` (case,
spaces and underscores ignored, plus its alias table): the first store's findings in its order,
then each later store's new findings in that store's order. A finding a store does not label is
unknown for that store's rows, so the loss leaves it out (:mod:`cxrflow.data.mixing` widens each
batch's labels to the model's findings with ``known`` 0 there).

This module reads manifests only (no pixels, no torch), so every user mistake -- a path that is not
a store, the same store twice, stores without a common image size, store weights that do not fit --
is one clear line before training starts. Loss weights and pixel statistics of the set are
combined from the stores' manifests: ``pos_weight`` = negatives / positives counted over the rows
where the finding is known, the pixel mean and standard deviation weighted by train rows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cxrflow.data.alignment import same_finding
from cxrflow.data.manifest import check_partition, read_manifest
from cxrflow.data.uncertain import resolve_policy, split_policy
from cxrflow.errors import CxrflowError


@dataclass(frozen=True)
class StoreEntry:
    """One store of the set: where it is, its manifest, and where its findings go in the model's."""

    path: str  # absolute
    name: str  # the store folder's name: the key of its figures in metrics.jsonl, its evaluation folder
    manifest: dict
    label_names: tuple[str, ...]  # the store's, in its order
    model_index: tuple[int, ...]  # the model output of each store finding, in the store's order
    identity: dict  # :func:`cxrflow.data.store.store_identity` at the run's size

    def rows(self, size: int, split: str) -> int:
        return int(self.manifest["rows"][str(int(size))].get(split, 0))


@dataclass(frozen=True)
class StoreSet:
    """The stores of a run trained on several, at one image size, with the model's findings."""

    stores: tuple[StoreEntry, ...]
    label_names: tuple[str, ...]  # the model's: the union of the stores' findings
    size: int

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.stores]

    def alignment(self) -> list[dict[str, str]]:
        """Per store, which model finding each of its findings trains (store finding -> model finding)."""
        return [{name: self.label_names[j] for name, j in zip(s.label_names, s.model_index)} for s in self.stores]

    def train_rows(self) -> list[int]:
        return [s.rows(self.size, "train") for s in self.stores]


def union_findings(name_lists: Sequence[Sequence[str]]) -> tuple[list[str], list[list[int]]]:
    """The model's findings (first list's order, then each later list's new findings) and, per list,
    the model index of each of its findings. Two findings of one store naming the same model finding
    (by spelling or alias) are an error."""
    model: list[str] = []
    indices: list[list[int]] = []
    for names in name_lists:
        own: list[int] = []
        for name in names:
            j = next((i for i, m in enumerate(model) if same_finding(m, name)), None)
            if j is None:
                model.append(str(name))
                j = len(model) - 1
            elif j in own:
                raise CxrflowError(
                    f"a store labels both {names[own.index(j)]!r} and {name!r}, which name one finding "
                    "(cxrflow.data.alignment); train on it alone"
                )
            own.append(j)
        indices.append(own)
    return model, indices


def open_stores(paths: Sequence[str | os.PathLike], size: int) -> StoreSet:
    """Read and check the stores of a run (train and val split at ``size`` in each); one clear line
    for a path that is not a store, one store named twice, or stores at no common size."""
    from cxrflow.data.store import store_identity

    absolute = [os.path.abspath(os.path.expanduser(os.fspath(p))) for p in paths]
    manifests = [read_manifest(p) for p in absolute]  # a path that is not a store names itself
    real = [os.path.realpath(p) for p in absolute]
    for i in range(len(absolute)):
        for j in range(i):
            if real[i] == real[j]:
                raise CxrflowError(f"--store names the same store twice ({paths[j]} and {paths[i]})", absolute[i])
    _check_sizes(absolute, manifests, size)
    identities = [store_identity(p, m, size) for p, m in zip(absolute, manifests)]
    for i in range(len(absolute)):
        for j in range(i):
            if identities[i] == identities[j]:
                raise CxrflowError(
                    f"{paths[i]} holds the same images and labels as {paths[j]} (the same store, copied); "
                    "give each store once",
                    absolute[i],
                )
    names = [Path(p).name for p in absolute]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise CxrflowError(
                f"two stores are both called {name!r} ({absolute[names.index(name)]} and {absolute[i]}); their "
                "figures and evaluation folders are named after the store folder, so rename one",
                absolute[i],
            )
    for p, m in zip(absolute, manifests):
        for split in ("train", "val"):
            check_partition(m, p, size, split)
            if int(m["rows"][str(int(size))][split]) == 0:
                raise CxrflowError(f"split {split!r} at size {size} is empty; nothing to {split} on", p)
    label_names, indices = union_findings([list(m["label_names"]) for m in manifests])
    entries = tuple(
        StoreEntry(p, n, m, tuple(m["label_names"]), tuple(ix), ident)
        for p, n, m, ix, ident in zip(absolute, names, manifests, indices, identities)
    )
    return StoreSet(entries, tuple(label_names), int(size))


def _check_sizes(paths: Sequence[str], manifests: Sequence[dict], size: int) -> None:
    """Every store must hold ``size``; the error names the sizes they all hold (or says there is none)."""
    held = [{int(s) for s in m.get("sizes", [])} for m in manifests]
    common = sorted(set.intersection(*held)) if held else []
    lacking = [p for p, h in zip(paths, held) if int(size) not in h]
    if not lacking:
        return
    if not common:
        listed = "; ".join(f"{Path(p).name}: {', '.join(map(str, sorted(h))) or 'none'}" for p, h in zip(paths, held))
        raise CxrflowError(
            f"the stores have no image size in common ({listed}); rebuild one with 'cxrflow etl ... --sizes N' "
            "at a size the others hold"
        )
    raise CxrflowError(
        f"the store has no {size} px images; the sizes every store holds: {', '.join(map(str, common))} (--size)",
        lacking[0],
    )


def check_store_weights(weights: Sequence[float], count: int) -> list[float]:
    """One positive, finite weight per store (empty: every store weighs 1)."""
    if not weights:
        return [1.0] * count
    if len(weights) != count:
        raise CxrflowError(f"--store-weights needs one weight per --store ({count}), got {len(weights)}")
    for w in weights:
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            raise CxrflowError(f"--store-weights must be positive numbers, got {w!r}")
    return [float(w) for w in weights]


def store_policy(policy: str, store_names: Sequence[str]) -> str:
    """``--uncertain`` for one store of the set: per-finding choices apply to the store's finding of
    that name (spelling or alias); choices about findings the store does not label are left out."""
    default, per_finding = split_policy(policy)
    mine = {}
    for name, value in per_finding.items():
        match = next((s for s in store_names if same_finding(s, name)), None)
        if match is not None:
            mine[match] = value
    return ",".join([default, *(f"{n}={v}" for n, v in mine.items())])


def check_policy_names(policy: str, label_names: Sequence[str]) -> None:
    """A per-finding ``--uncertain`` choice must name a finding of at least one store."""
    _, per_finding = split_policy(policy)
    for name in per_finding:
        if not any(same_finding(name, m) for m in label_names):
            raise CxrflowError(
                f"--uncertain names {name!r}, a finding of none of the stores ({', '.join(label_names)})"
            )


def known_counts(manifest: dict, policy: str | tuple[str, ...]) -> tuple[list[int], list[int]]:
    """(positives, negatives) per finding of one store's train split, over the labels known under
    ``policy`` (resolved for this store: one for all findings or one per finding)."""
    names = list(manifest["label_names"])
    counts = manifest.get("label_counts")
    if "uncertain_policies" in manifest or counts:
        if not counts or any(n not in counts for n in names):
            raise CxrflowError("the store's manifest has no label_counts for its findings; re-run 'cxrflow etl'")
        pos, neg = [], []
        for j, n in enumerate(names):
            c = counts[n]
            p = policy if isinstance(policy, str) else policy[j]
            pos.append(int(c["positive"]) + (int(c["uncertain"]) if p == "ones" else 0))
            neg.append(int(c["negative"]) + (int(c["uncertain"]) if p == "zeros" else 0))
        return pos, neg
    positives = manifest.get("positives") or {}
    n_train = int(next(iter(manifest["rows"].values()), {}).get("train", 0))
    pos = [int(positives.get(n, 0)) for n in names]
    return pos, [n_train - p for p in pos]


def combined_pos_weight(stores: StoreSet, policy: str) -> list[float]:
    """negatives / positives per model finding, counted over every store's train rows where it is
    known (1 positive at least); a finding no store's train split knows gets 0."""
    k = len(stores.label_names)
    pos, neg = [0] * k, [0] * k
    for s in stores.stores:
        p, n = known_counts(s.manifest, resolve_policy(store_policy(policy, s.label_names), s.label_names))
        for j, a, b in zip(s.model_index, p, n):
            pos[j] += a
            neg[j] += b
    return [float(neg[j] / max(pos[j], 1)) for j in range(k)]


def combined_pixel_stats(stores: StoreSet) -> tuple[float, float]:
    """(mean, std) of the train pixels of every store together: each store's weighted by its train rows."""
    from cxrflow.data.manifest import pixel_stats

    rows = stores.train_rows()
    stats = [pixel_stats(s.manifest, stores.size) for s in stores.stores]
    total = sum(rows)
    mean = sum(n * m for n, (m, _) in zip(rows, stats)) / total
    second = sum(n * (sd * sd + m * m) for n, (m, sd) in zip(rows, stats)) / total
    return float(mean), float(math.sqrt(max(second - mean * mean, 1e-12)))


__all__ = [
    "StoreEntry",
    "StoreSet",
    "check_policy_names",
    "check_store_weights",
    "combined_pixel_stats",
    "combined_pos_weight",
    "known_counts",
    "open_stores",
    "store_policy",
    "union_findings",
]
