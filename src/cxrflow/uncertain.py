"""Uncertain and unmentioned labels: per-row label states and the policy chosen at training time.

Collections labelled by report parsers (CheXpert, MIMIC-CXR) give each finding one of four values:
positive, negative, uncertain (``-1.0``) or not mentioned (blank). The store keeps, per row, the
``labels`` (1 = positive, else 0) and the ``labels_known`` states:

======  ==============================================================================
state   meaning
======  ==============================================================================
``1``   known: ``labels`` holds the value (positive or negative)
``0``   not mentioned: unknown whatever the policy, left out of loss and metrics
``2``   uncertain: the policy decides (Irvin et al. 2019)
======  ==============================================================================

Policies (``--uncertain``): ``ignore`` (U-Ignore: uncertain labels are unknown, masked out),
``ones`` (U-Ones: uncertain = positive), ``zeros`` (U-Zeros: uncertain = negative). Evaluation
always uses ``ignore``: metrics see the labels that are known for certain. Stores of collections
with every label known (NIH) have no ``labels_known`` column and all labels known.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cxrflow.errors import CxrflowError

UNMENTIONED, KNOWN, UNCERTAIN = 0, 1, 2
POLICIES = ("ignore", "ones", "zeros")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise CxrflowError(f"--uncertain must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy


def apply_policy(labels: np.ndarray, states: np.ndarray | None, policy: str = "ignore") -> tuple[np.ndarray, np.ndarray]:
    """(labels, known) uint8 arrays after ``policy``; ``states`` None means every label is known."""
    if states is None:
        return labels, np.ones_like(labels, dtype=np.uint8)
    uncertain = states == UNCERTAIN
    if policy == "ignore":
        return labels, (states == KNOWN).astype(np.uint8)
    value = np.uint8(1 if policy == "ones" else 0)
    return np.where(uncertain, value, labels).astype(np.uint8), (states != UNMENTIONED).astype(np.uint8)


def label_counts(labels: np.ndarray, states: np.ndarray | None, names: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per finding: positives, negatives, uncertain and unknown (not mentioned) rows."""
    labels = np.asarray(labels, dtype=np.uint8).reshape(-1, len(names))
    if states is None:
        states = np.full_like(labels, KNOWN)
    known = states == KNOWN
    pos = (known & (labels == 1)).sum(axis=0)
    neg = (known & (labels == 0)).sum(axis=0)
    unc = (states == UNCERTAIN).sum(axis=0)
    unk = (states == UNMENTIONED).sum(axis=0)
    return {
        n: {"positive": int(pos[j]), "negative": int(neg[j]), "uncertain": int(unc[j]), "unknown": int(unk[j])}
        for j, n in enumerate(names)
    }


def pos_weight(counts: dict[str, dict[str, int]], names: Sequence[str], policy: str = "ignore") -> list[float]:
    """negatives / positives per finding over the labels known under ``policy`` (1 positive at least)."""
    out = []
    for n in names:
        c = counts[n]
        pos = c["positive"] + (c["uncertain"] if policy == "ones" else 0)
        neg = c["negative"] + (c["uncertain"] if policy == "zeros" else 0)
        out.append(float(neg / max(pos, 1)))
    return out


def masked_bce(logits, labels, known, pos_weight=None):
    """Mean BCE-with-logits over the known labels only (``known`` 0/1 like ``labels``; torch tensors)."""
    import torch.nn.functional as F

    loss = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=pos_weight, reduction="none")
    return (loss * known).sum() / known.sum().clamp_min(1.0)


class MaskedBCEWithLogits:
    """The training loss when some labels are not known: :func:`masked_bce` with ``pos_weight``."""

    def __init__(self, pos_weight=None):
        self.pos_weight = pos_weight

    def __call__(self, logits, labels, known):
        return masked_bce(logits, labels, known, self.pos_weight)


def policy_pos_weight(manifest: dict, policy: str):
    """float32 tensor of ``pos_weight`` under ``policy`` from the manifest's ``label_counts``."""
    import torch

    names = manifest["label_names"]
    counts = manifest.get("label_counts")
    if not counts or any(n not in counts for n in names):
        raise CxrflowError("the store's manifest has no label_counts for its findings; re-run 'cxrflow etl'")
    return torch.tensor(pos_weight(counts, names, check_policy(policy)), dtype=torch.float32)
