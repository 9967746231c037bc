"""Demographics fusion, wide and deep: a per-finding logistic term on age, sex and view added to the logits.

A fused model's logits are ``head(image features) + demographic_logits(age, sex, view)``. The
demographic term (:class:`DemographicLogits`) is, per finding, a logistic regression on six
features: the three fields standardised with the training split's mean and spread (0 where
unknown) and the three known-flags. It is fitted on the training split with scikit-learn before
the first epoch (:func:`init_from_store`), so training starts where demographics alone end, and
the image part only has to learn what the patient's age, sex and view do not already say. It is
trained in every stage (also while the backbone is frozen) with its own learning rate and no
weight decay (:func:`param_groups`). Its standardisation travels in the checkpoint as buffers.

The same features and fit give ``cxrflow evaluate`` its demographics-only baseline
(:mod:`cxrflow.results.demographics_baseline`): one implementation of both.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrflow.data.demographics import FIELDS

#: Features of the demographic term: the standardised fields, then their known-flags.
FEATURES = (*FIELDS, *(f"{f}_known" for f in FIELDS))
#: Learning rate of the demographic term relative to the stage's (measured in benchmarks/fusion.py).
FUSION_LR_FACTOR = 1.0
#: Inverse L2 strength of the logistic-regression fits (scikit-learn's default).
LOGISTIC_C = 1.0
#: Standardisation used before a fit (age / 100 around 50 years; 0/1 codes around one half).
_DEFAULT_CENTER = (0.5, 0.5, 0.5)
_DEFAULT_SCALE = (0.2, 0.5, 0.5)


def standardised_features(d: torch.Tensor, center: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``[N, F]`` encoded demographics (NaN = unknown) -> ``[N, 2F]``: ``(d - center) / scale``, 0 where
    unknown, then the known-flags."""
    known = ~torch.isnan(d)
    values = torch.where(known, (d - center) / scale, torch.zeros_like(d))
    return torch.cat([values, known.to(d.dtype)], dim=1)


class DemographicLogits(nn.Module):
    """``[N, 3]`` demographics (NaN = unknown) -> ``[N, K]`` logits: a logistic term per finding.

    Buffers ``center``/``scale`` standardise the known values (unknown ones become 0, the training
    mean); ``weight`` ``[K, 6]`` and ``bias`` ``[K]`` start as a new ``nn.Linear``'s until fitted
    (:func:`init_from_store`, which training calls before the first epoch).
    """

    def __init__(self, num_classes: int, fields: int = len(FIELDS)):
        super().__init__()
        self.fields = fields
        self.out_features = num_classes
        self.register_buffer("center", torch.tensor(_DEFAULT_CENTER[:fields], dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(_DEFAULT_SCALE[:fields], dtype=torch.float32))
        linear = nn.Linear(2 * fields, num_classes)  # its initialisation until fitted, as any new layer has
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def features(self, demographics: torch.Tensor) -> torch.Tensor:
        """``[N, 2 * fields]``: standardised values (0 where unknown) and known-flags."""
        if demographics.dim() != 2 or demographics.shape[1] != self.fields:
            raise ValueError(f"expected demographics [N, {self.fields}], got {tuple(demographics.shape)}")
        d = demographics.to(device=self.weight.device, dtype=self.weight.dtype)
        return standardised_features(d, self.center, self.scale)

    def forward(self, demographics: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.features(demographics), self.weight, self.bias)

    @torch.no_grad()
    def load_fit(self, fit: dict[str, np.ndarray]) -> None:
        """Take a :func:`fit_logistic` result (standardisation, coefficients, intercepts)."""
        for name in ("center", "scale", "weight", "bias"):
            getattr(self, name).copy_(torch.as_tensor(np.asarray(fit[name]), dtype=torch.float32))


# --- the fit ---------------------------------------------------------------------------------------


def standardisation(demographics: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(center, scale, fields with no known value) of encoded demographics ``[N, 3]`` (NaN = unknown)."""
    d = np.asarray(demographics, dtype=np.float64)
    center = np.array(_DEFAULT_CENTER[: d.shape[1]], dtype=np.float64)
    scale = np.array(_DEFAULT_SCALE[: d.shape[1]], dtype=np.float64)
    missing = []
    for j in range(d.shape[1]):
        values = d[~np.isnan(d[:, j]), j]
        if values.size == 0:
            missing.append(FIELDS[j])
            continue
        center[j] = values.mean()
        scale[j] = values.std() if values.std() > 1e-6 else 1.0
    return center, scale, missing


def design(demographics: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The :class:`DemographicLogits` features of ``demographics`` as a float64 array (for scikit-learn)."""
    d, c, s = (torch.as_tensor(np.asarray(a, dtype=np.float64)) for a in (demographics, center, scale))
    return standardised_features(d, c, s).numpy()


def fit_logistic(
    demographics: np.ndarray, labels: np.ndarray, known: np.ndarray | None = None, *, seed: int = 0
) -> dict[str, Any]:
    """Per finding, a logistic regression (scikit-learn, L2 with C = :data:`LOGISTIC_C`) on the
    standardised demographics and their known-flags, over the images whose label is known.

    Returns ``center``, ``scale`` ``[3]``, ``weight`` ``[K, 6]``, ``bias`` ``[K]`` and ``missing``
    (fields with no known value: their features are constant, so they get no weight). A finding
    with one label value only gets weight 0 and the bias of its (clipped) prevalence.
    """
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels)
    known = np.ones_like(labels, dtype=bool) if known is None else np.asarray(known).astype(bool)
    center, scale, missing = standardisation(demographics)
    x = design(demographics, center, scale)
    k = labels.shape[1]
    weight, bias = np.zeros((k, x.shape[1])), np.zeros(k)
    for j in range(k):
        rows = known[:, j]
        y = labels[rows, j].astype(int)
        if y.size == 0 or y.min() == y.max():
            p = float(np.clip(y.mean() if y.size else 0.5, 1e-3, 1 - 1e-3))
            bias[j] = np.log(p / (1 - p))
            continue
        model = LogisticRegression(C=LOGISTIC_C, max_iter=1000, random_state=seed).fit(x[rows], y)
        weight[j], bias[j] = model.coef_[0], model.intercept_[0]
    return {"center": center, "scale": scale, "weight": weight, "bias": bias, "missing": missing}


def logistic_scores(fit: dict[str, Any], demographics: np.ndarray) -> np.ndarray:
    """``[N, K]`` logits of a :func:`fit_logistic` result on encoded demographics."""
    x = design(demographics, fit["center"], fit["scale"])
    return x @ np.asarray(fit["weight"]).T + np.asarray(fit["bias"])


# --- the store -------------------------------------------------------------------------------------


def read_split_demographics(
    store: str | os.PathLike, size: int, split: str, label_names: Sequence[str], uncertain: str = "ignore"
) -> dict[str, np.ndarray]:
    """``image_id``, ``patient_id``, ``labels``, ``known`` and encoded ``demographics`` of a split,
    read without its pixels (labels after the run's uncertain-label policy, as training sees them)."""
    import pyarrow.dataset as ds

    from cxrflow.data.demographics import encode_arrow
    from cxrflow.data.store import KNOWN_COLUMN, split_dir
    from cxrflow.data.uncertain import apply_policy, resolve_policy

    dataset = ds.dataset(split_dir(store, size, split), format="parquet")
    columns = ["image_id", "patient_id", "labels", "age", "sex", "view"]
    has_states = KNOWN_COLUMN in dataset.schema.names
    table = dataset.to_table(columns=columns + ([KNOWN_COLUMN] if has_states else []))
    n, num_labels = table.num_rows, len(label_names)

    def matrix(name: str) -> np.ndarray:
        flat = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(n, num_labels).astype(np.uint8)

    states = matrix(KNOWN_COLUMN) if has_states else None
    labels, known = apply_policy(matrix("labels"), states, resolve_policy(uncertain, label_names))
    return {
        "image_id": np.asarray(table.column("image_id").to_pylist(), dtype=object),
        "patient_id": table.column("patient_id").to_numpy().astype(np.int64),
        "labels": labels,
        "known": known,
        "demographics": encode_arrow(*(table.column(c).combine_chunks() for c in ("age", "sex", "view"))),
    }


def init_from_store(
    model: nn.Module,
    store: str | os.PathLike,
    size: int,
    *,
    uncertain: str = "ignore",
    pos_weight: Sequence[float] | None = None,
    seed: int = 0,
) -> str:
    """Fit ``model.fusion`` (a :class:`DemographicLogits`) on the store's training split; returns a note.

    With the loss's ``pos_weight``, each bias is shifted by ``log(pos_weight)``: the optimum of the
    weighted loss for a logistic model, so the first steps do not spend themselves on the offset.
    """
    from cxrflow.data.store import read_manifest

    rows = read_split_demographics(store, size, "train", read_manifest(store)["label_names"], uncertain)
    return init_from_rows(model, rows, pos_weight=pos_weight, seed=seed)


def init_from_rows(
    model: nn.Module, rows: dict[str, np.ndarray], *, pos_weight: Sequence[float] | None = None, seed: int = 0
) -> str:
    """Fit ``model.fusion`` on training rows (``demographics``, ``labels``, ``known`` in the model's
    findings, as :func:`read_split_demographics` gives them); returns a note (see :func:`init_from_store`)."""
    fusion = model.fusion
    fit = fit_logistic(rows["demographics"], rows["labels"], rows["known"], seed=seed)
    if pos_weight is not None:
        w = np.asarray(pos_weight, dtype=np.float64)
        fit["bias"] = fit["bias"] + np.where(w > 0, np.log(np.where(w > 0, w, 1.0)), 0.0)
    fusion.load_fit(fit)
    missing = f"; no known {', '.join(fit['missing'])} in the training split (left out)" if fit["missing"] else ""
    return f"demographic term fitted by logistic regression on {len(rows['labels'])} training images{missing}"


# --- the optimiser -----------------------------------------------------------------------------------


def param_groups(
    model: nn.Module, params: Sequence[nn.Parameter], lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Optimiser groups: the model's trainable parameters at ``lr`` with ``weight_decay`` first, then the
    demographic term's at ``lr * FUSION_LR_FACTOR`` without weight decay (a decay would pull a fitted
    logistic regression back towards 0)."""
    fusion = getattr(model, "fusion", None)
    own = {id(p) for p in fusion.parameters()} if isinstance(fusion, DemographicLogits) else set()
    groups = [{"params": [p for p in params if id(p) not in own], "lr": lr, "weight_decay": weight_decay}]
    wide = [p for p in params if id(p) in own]
    if wide:
        groups.append({"params": wide, "lr": lr * FUSION_LR_FACTOR, "weight_decay": 0.0})
    return groups


def make_fusion(num_classes: int) -> DemographicLogits:
    """The fusion module of ``fusion="demographics"``."""
    return DemographicLogits(num_classes)
