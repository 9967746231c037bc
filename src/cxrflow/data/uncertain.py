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
``ones`` (U-Ones: uncertain = positive), ``zeros`` (U-Zeros: uncertain = negative), optionally
per finding after the default: ``zeros,Atelectasis=ones,Edema=ones``. Evaluation
always uses ``ignore``: metrics see the labels that are known for certain. Stores of collections
with every label known (NIH) have no ``labels_known`` column and all labels known.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from cxrflow.errors import CxrflowError

if TYPE_CHECKING:  # numpy is imported where it is used: the policy names are read by --help
    import numpy as np

UNMENTIONED, KNOWN, UNCERTAIN = 0, 1, 2
POLICIES = ("ignore", "ones", "zeros")


def _parts(policy: str) -> tuple[str, dict[str, str]]:
    """``"zeros,Edema=ones"`` -> ("zeros", {"Edema": "ones"}); an error naming the bad part."""
    default, per_finding = None, {}
    for part in (p.strip() for p in str(policy).split(",")):
        name, sep, value = part.rpartition("=")
        value = value.strip()
        if value not in POLICIES or (sep and not name.strip()) or (not sep and default is not None):
            raise CxrflowError(
                f"--uncertain must be one of {', '.join(POLICIES)}, optionally followed by per-finding choices "
                f"like 'zeros,Atelectasis=ones,Edema=ones'; got {policy!r}"
            )
        if sep:
            per_finding[name.strip()] = value
        else:
            default = value
    return default or "ignore", per_finding


def split_policy(policy: str) -> tuple[str, dict[str, str]]:
    """(default policy, {finding: policy}) of a well-formed ``policy``; an error naming the bad part."""
    return _parts(policy)


def check_policy(policy: str) -> str:
    """``policy`` if it is well formed (the finding names are checked against a store later)."""
    _parts(policy)
    return policy


def resolve_policy(policy: str, names: Sequence[str]) -> str | tuple[str, ...]:
    """A plain policy as is; one with per-finding choices as one policy per finding (store order)."""
    default, per_finding = _parts(policy)
    if not per_finding:
        return default
    unknown = [n for n in per_finding if n not in names]
    if unknown:
        raise CxrflowError(f"--uncertain names {unknown[0]!r}, not a finding of this store ({', '.join(names)})")
    return tuple(per_finding.get(n, default) for n in names)


def apply_policy(
    labels: np.ndarray, states: np.ndarray | None, policy: str | Sequence[str] = "ignore"
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, known) uint8 arrays after ``policy`` (one for all findings, or one per finding);
    ``states`` None means every label is known."""
    import numpy as np

    if states is None:
        return labels, np.ones_like(labels, dtype=np.uint8)
    per = np.broadcast_to(np.asarray([policy] if isinstance(policy, str) else list(policy)), (states.shape[-1],))
    uncertain = states == UNCERTAIN
    value = np.where(per == "ones", 1, 0).astype(np.uint8)
    out = np.where(uncertain & (per != "ignore"), value, labels).astype(np.uint8)
    known = (states == KNOWN) | (uncertain & (per != "ignore"))
    return out, known.astype(np.uint8)


def label_counts(labels: np.ndarray, states: np.ndarray | None, names: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per finding: positives, negatives, uncertain and unknown (not mentioned) rows."""
    import numpy as np

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
    resolved = resolve_policy(policy, list(names))
    out = []
    for j, n in enumerate(names):
        c = counts[n]
        policy = resolved if isinstance(resolved, str) else resolved[j]
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
    return torch.tensor(pos_weight(counts, names, policy), dtype=torch.float32)
